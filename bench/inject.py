#!/usr/bin/env python3
"""SMTP acceptance benchmark: N messages of S bytes over C concurrent sessions.

By default it starts its own ``sluice serve`` (from the same virtualenv) on
free 127.0.0.1 ports, with its data directory in a fresh temporary directory
on disk, and holds all mail in the queue (the test domain is routed to a port
where nothing listens, ``retry_interval`` is 1h, and a suspend rule for the
domain is created through the admin API before the run), so the figure is
acceptance only: SMTP session + durable spool commit (fsync) + 250.

With ``--smtp HOST:PORT`` it targets a server that is already running; give
``--pid PID`` to have that server's RSS and CPU sampled as well.

The client is a small raw-asyncio SMTP client (one command at a time, like
Postfix's ``smtp-source``; ``--pipelining`` sends MAIL/RCPT/DATA together).
It prints its own CPU use, so one can check the load generator is not the
bottleneck.

    .venv/bin/python bench/inject.py -n 20000 -s 10240 -c 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

try:
    import orjson

    def _json(obj: object) -> str:
        return orjson.dumps(obj).decode()
except ImportError:  # pragma: no cover - orjson is a sluice dependency
    import json

    def _json(obj: object) -> str:
        return json.dumps(obj, separators=(",", ":"))


DOMAIN = "bench.example"
SENDER = "bench@bench-client.example"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# message generation


_TEXT = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod "
         b"tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, "
         b"quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo. ")


class Bodies:
    """Bodies of exactly ``n`` bytes: lines of at most 76 characters, CRLF-terminated."""

    def __init__(self) -> None:
        self._cache: dict[int, bytes] = {}
        text = _TEXT * 2
        self._text: list[bytes] = []
        for k in range(0, len(_TEXT), 7):
            line = text[k:k + 76]
            if line[:1] in (b" ", b"."):  # no leading dot (no dot-stuffing needed)
                line = b"x" + line[1:]
            self._text.append(line)

    def _line(self, k: int, width: int) -> bytes:
        return self._text[k % len(self._text)][:width] + b"\r\n"

    def get(self, n: int) -> bytes:
        """``n`` >= 2 bytes of body."""
        body = self._cache.get(n)
        if body is None:
            full, rem = divmod(n, 78)  # 76 characters + CRLF
            if rem == 1:  # 78 + 1 = (40 + 2) + (35 + 2)
                full -= 1
                tail = [self._line(full, 40), self._line(full + 1, 35)]
            elif rem == 0:
                tail = []
            else:
                tail = [self._line(full, rem - 2)]
            body = b"".join([self._line(k, 76) for k in range(full)] + tail)
            assert len(body) == n
            self._cache[n] = body
        return body


def build_message(i: int, size: int, run_id: str, date: str, bodies: Bodies) -> bytes:
    """An RFC 5322 message of ``size`` bytes (no line starts with a dot)."""
    head = (f"From: Bench Sender <{SENDER}>\r\n"
            f"To: <user{i}@{DOMAIN}>\r\n"
            f"Subject: Sluice benchmark message {i}\r\n"
            f"Message-ID: <{i}.{run_id}@bench-client.example>\r\n"
            f"Date: {date}\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n").encode("ascii")
    pad = size - len(head)
    if pad < 2:
        return head + b"x\r\n"  # smaller than the headers: one short body line
    msg = head + bodies.get(pad)
    assert len(msg) == size, (len(msg), size)
    return msg


# --------------------------------------------------------------------------
# the server under test


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fs_type(path: Path) -> str:
    """The file system type that holds ``path`` (from /proc/mounts)."""
    best, kind = "", "?"
    try:
        real = str(path.resolve())
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) > len(best):
                        best, kind = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    except OSError:
        pass
    return kind


def terminate(proc: subprocess.Popen, what: str, timeout: float = 30.0) -> tuple[int | None, float]:
    """SIGTERM and wait (SIGKILL after ``timeout``); returns (exit code, seconds
    it took). A process that already exited gives its code and 0."""
    if proc.poll() is not None:
        return proc.returncode, 0.0
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
        print(f"{what} did not stop within {timeout:.0f} s of SIGTERM: killed",
              file=sys.stderr, flush=True)
    return code, time.monotonic() - t0


class OwnServer:
    """A ``sluice serve`` subprocess with a throw-away config and data dir."""

    def __init__(self, workdir: Path | None, keep: bool, suspend: bool,
                 workers: int | None = None) -> None:
        self.workers = workers
        self.tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-", dir=workdir))
        self.keep = keep
        self.suspend = suspend
        self.smtp_port = free_port()
        self.http_port = free_port()
        self.dead_port = free_port()  # nothing listens here
        self.config = self.tmp / "sluice.toml"
        self.log_path = self.tmp / "server.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def smtp(self) -> tuple[str, int]:
        return ("127.0.0.1", self.smtp_port)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        data = self.tmp / "data"
        self.config.write_text(
            "[server]\n"
            f'data_dir = "{data}"\n'
            'node_name = "bench"\n'
            + (f"workers = {self.workers}\n" if self.workers is not None else "")
            + "[smtp]\n"
            f'listen = ["127.0.0.1:{self.smtp_port}"]\n'
            'hostname = "sluice-bench.example"\n'
            "[http]\n"
            f'listen = ["127.0.0.1:{self.http_port}"]\n'
            "[queue]\n"
            'retry_interval = "1h"\n'
            "[routes]\n"
            f'"{DOMAIN}" = "127.0.0.1:{self.dead_port}"\n')
        exe = Path(sys.executable).parent / "sluice"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(exe), "serve", "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sluice serve exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                with socket.create_connection(self.smtp, timeout=1) as s:
                    s.settimeout(5)
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("sluice serve did not answer on SMTP within 30s:\n" + self.log_tail())
            time.sleep(0.05)
        if self.suspend:
            self._suspend()

    def _suspend(self) -> None:
        import httpx
        r = httpx.post(f"{self.http}/api/admin/suspend/v1",
                       json={"domain": DOMAIN, "reason": "benchmark: hold mail", "duration": "1h"},
                       timeout=10)
        if r.status_code != 200:
            raise RuntimeError(f"could not suspend {DOMAIN}: HTTP {r.status_code} {r.text}")

    def scheduled(self) -> int | None:
        """Messages in the scheduled queues (from /metrics.json), if it answers."""
        try:
            import httpx
            r = httpx.get(f"{self.http}/metrics.json", timeout=10)
            r.raise_for_status()
            return sum(r.json().get("scheduled", {}).values())
        except Exception:
            return None

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM, wait; returns (exit code, seconds it took to stop)."""
        code, took = None, 0.0
        if self.proc is not None:
            code, took = terminate(self.proc, "server")
        if self._log is not None:
            self._log.close()
        return code, took

    def cleanup(self) -> None:
        if self.keep:
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# sampling the server process


@dataclass
class ProcSample:
    rss_kb: int = 0
    hwm_kb: int = 0
    peak_rss_kb: int = 0
    cpu_start: dict[int, float] | None = None
    cpu_end: dict[int, float] | None = None
    threads_start: dict[int, float] = field(default_factory=dict)
    threads_end: dict[int, float] = field(default_factory=dict)


def _status_kb(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def _stat_cpu(path: str) -> float:
    with open(path) as fh:
        data = fh.read()
    fields = data[data.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (sluice's reception and delivery processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo.extend(int(c) for c in fh.read().split())
    return out


def proc_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of ``pid`` and of each of its descendants."""
    out = {}
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            out[p] = _stat_cpu(f"/proc/{p}/stat")
    return out


def thread_cpu(pid: int) -> dict[int, float]:
    out = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                out[int(tid)] = _stat_cpu(f"/proc/{pid}/task/{tid}/stat")
    return out


def cpu_times() -> list[int]:
    """Machine-wide jiffies: user, nice, system, idle, iowait, irq, softirq, steal."""
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:9]]


def machine_busy(t0: list[int], t1: list[int]) -> dict[str, float]:
    """Cores in use over the interval, split as /proc/stat does."""
    d = [b - a for a, b in zip(t0, t1)]
    total = sum(d) or 1
    ncpu = os.cpu_count() or 1
    cores = lambda x: round(x / total * ncpu, 2)  # noqa: E731
    return {"busy": cores(total - d[3] - d[4]), "user": cores(d[0] + d[1]), "system": cores(d[2]),
            "softirq": cores(d[5] + d[6]), "iowait": cores(d[4]), "steal": cores(d[7])}


async def sample_rss(pid: int, ps: ProcSample, stop: asyncio.Event, every: float = 0.1) -> None:
    """RSS of the whole process tree (main process and its children), sampled."""
    while not stop.is_set():
        rss = hwm = 0
        for p in process_tree(pid):
            with contextlib.suppress(OSError, ValueError):
                r, h = _status_kb(p)
                rss, hwm = rss + r, hwm + h
        ps.rss_kb, ps.hwm_kb = rss, hwm
        ps.peak_rss_kb = max(ps.peak_rss_kb, rss)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


# --------------------------------------------------------------------------
# the load generator


class SmtpError(Exception):
    pass


@dataclass
class Stats:
    accepted: int = 0
    errors: int = 0
    connections: int = 0
    error_samples: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        key = what[:160]
        self.error_samples[key] = self.error_samples.get(key, 0) + 1


async def _reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    while True:
        line = await reader.readline()
        if not line:
            raise SmtpError("connection closed by server")
        if len(line) < 4 or line[3:4] != b"-":
            try:
                return int(line[:3]), line.rstrip()
            except ValueError:
                raise SmtpError(f"bad reply {line[:80]!r}") from None


async def _expect(reader: asyncio.StreamReader, ok: int, what: str) -> None:
    code, line = await _reply(reader)
    if code != ok:
        raise SmtpError(f"{what}: {line.decode('ascii', 'replace')}")


class Injector:
    def __init__(self, host: str, port: int, n: int, size: int, concurrency: int, reuse: int,
                 pipelining: bool, timeout: float) -> None:
        self.host, self.port = host, port
        self.n, self.size, self.concurrency = n, size, concurrency
        self.reuse = max(1, reuse)
        self.pipelining = pipelining
        self.timeout = timeout
        self.next = 0
        self.stats = Stats()
        self.run_id = uuid.uuid4().hex[:12]
        self.date = formatdate(usegmt=True)
        self.bodies = Bodies()

    def _take(self) -> int | None:
        if self.next >= self.n:
            return None
        i = self.next
        self.next += 1
        return i

    async def _session(self) -> bool:
        """One connection, up to ``reuse`` messages; False when none are left."""
        first = self._take()
        if first is None:
            return False
        st = self.stats
        i: int | None = first
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=1 << 16), self.timeout)
            st.connections += 1
            await asyncio.wait_for(_expect(reader, 220, "greeting"), self.timeout)
            writer.write(b"EHLO bench-client.example\r\n")
            await asyncio.wait_for(_expect(reader, 250, "EHLO"), self.timeout)
            sent = 0
            while i is not None:
                msg = build_message(i, self.size, self.run_id, self.date, self.bodies)
                t0 = time.perf_counter()
                await asyncio.wait_for(self._send(reader, writer, i, msg), self.timeout)
                st.latencies.append(time.perf_counter() - t0)
                st.accepted += 1
                sent += 1
                i = self._take() if sent < self.reuse else None
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_reply(reader), self.timeout)
        except (SmtpError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            # the message under way failed; the rest of this session's share is
            # taken again by the next session
            st.error(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        return True

    async def _send(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    i: int, msg: bytes) -> None:
        cmds = (f"MAIL FROM:<{SENDER}> SIZE={len(msg)}\r\n".encode(),
                f"RCPT TO:<user{i}@{DOMAIN}>\r\n".encode(), b"DATA\r\n")
        if self.pipelining:
            writer.write(b"".join(cmds))
            await _expect(reader, 250, "MAIL")
            await _expect(reader, 250, "RCPT")
            await _expect(reader, 354, "DATA")
        else:
            writer.write(cmds[0])
            await _expect(reader, 250, "MAIL")
            writer.write(cmds[1])
            await _expect(reader, 250, "RCPT")
            writer.write(cmds[2])
            await _expect(reader, 354, "DATA")
        writer.write(msg)
        writer.write(b".\r\n")
        await _expect(reader, 250, "end of DATA")

    async def _worker(self) -> None:
        while await self._session():
            pass

    async def _progress(self, t0: float, every: float) -> None:
        last_n, last_t = 0, t0
        while True:
            await asyncio.sleep(every)
            now = time.perf_counter()
            n = self.stats.accepted
            print(f"  {now - t0:6.1f}s  accepted {n:>7}  errors {self.stats.errors:>5}  "
                  f"{(n - last_n) / (now - last_t):8.0f} msg/s", file=sys.stderr, flush=True)
            last_n, last_t = n, now

    async def run(self, progress: float) -> float:
        t0 = time.perf_counter()
        prog = asyncio.create_task(self._progress(t0, progress)) if progress > 0 else None
        await asyncio.gather(*(self._worker() for _ in range(self.concurrency)))
        elapsed = time.perf_counter() - t0
        if prog is not None:
            prog.cancel()
        return elapsed


# --------------------------------------------------------------------------
# main


def _pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def _host_port(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--messages", type=int, default=20000, help="messages to send (20000)")
    p.add_argument("-s", "--size", type=int, default=10240, help="message size in bytes (10240)")
    p.add_argument("-c", "--concurrency", type=int, default=50, help="concurrent SMTP sessions (50)")
    p.add_argument("--reuse", type=int, default=1,
                   help="messages per SMTP connection (1: a connection per message, "
                        "like smtp-source's default)")
    p.add_argument("--pipelining", action="store_true",
                   help="send MAIL, RCPT and DATA in one write (default: one at a time)")
    p.add_argument("--smtp", metavar="HOST:PORT", help="target a running server instead of starting one")
    p.add_argument("--pid", type=int, help="with --smtp: the server's pid, to sample RSS and CPU")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the temporary data dir goes (default: the system temp dir)")
    p.add_argument("--workers", type=int, default=None,
                   help="[server] workers for the own server (default: sluice's default)")
    p.add_argument("--keep", action="store_true", help="keep the temporary dir (config, spool, logs)")
    p.add_argument("--no-suspend", dest="suspend", action="store_false",
                   help="do not suspend the test domain: each message is then claimed, "
                        "tried once against the dead route (connection refused) and "
                        "rescheduled 1h later, so delivery-side work is measured too")
    p.add_argument("--timeout", type=float, default=120.0, help="per SMTP step, seconds (120)")
    p.add_argument("--progress", type=float, default=5.0,
                   help="seconds between progress lines on stderr (0: none)")
    p.add_argument("--hold", type=float, default=0.0,
                   help="seconds to wait after starting the server and before sending "
                        "(e.g. to attach a profiler)")
    args = p.parse_args(argv)
    if args.pid and not args.smtp:
        p.error("--pid goes with --smtp")
    if args.messages <= 0 or args.size <= 0 or args.concurrency <= 0 or args.reuse <= 0:
        p.error("-n, -s, -c and --reuse must be positive")
    return args


async def amain(args: argparse.Namespace) -> int:
    own: OwnServer | None = None
    if args.smtp:
        host, port = _host_port(args.smtp)
        pid = args.pid
    else:
        own = OwnServer(args.workdir, args.keep, args.suspend, args.workers)
        print(f"starting sluice serve: data in {own.tmp} on {fs_type(own.tmp)}", file=sys.stderr)
        await asyncio.to_thread(own.start)
        host, port = own.smtp
        pid = own.proc.pid  # type: ignore[union-attr]
        print(f"server pid {pid}, SMTP {host}:{port}, HTTP {own.http}", file=sys.stderr)
    result: dict = {}
    code = 0
    try:
        if args.hold > 0:
            print(f"holding {args.hold:.0f}s before sending", file=sys.stderr, flush=True)
            await asyncio.sleep(args.hold)
        ps = ProcSample()
        stop = asyncio.Event()
        sampler = None
        if pid:
            with contextlib.suppress(OSError):
                ps.cpu_start = proc_cpu(pid)
                ps.threads_start = thread_cpu(pid)
            sampler = asyncio.create_task(sample_rss(pid, ps, stop))
        inj = Injector(host, port, args.messages, args.size, args.concurrency, args.reuse,
                       args.pipelining, args.timeout)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0 = cpu_times()
        elapsed = await inj.run(args.progress)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        busy = machine_busy(cpu0, cpu_times())
        if pid:
            with contextlib.suppress(OSError):
                ps.cpu_end = proc_cpu(pid)
                ps.threads_end = thread_cpu(pid)
            stop.set()
            await sampler  # type: ignore[misc]
        st = inj.stats
        client_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        rate = st.accepted / elapsed if elapsed > 0 else 0.0
        mbps = st.accepted * args.size / elapsed / 1e6 if elapsed > 0 else 0.0
        server_cpu = None
        procs: dict[int, float] = {}
        if ps.cpu_start is not None and ps.cpu_end is not None:
            procs = {p: t - ps.cpu_start.get(p, 0.0) for p, t in ps.cpu_end.items()}
            server_cpu = sum(procs.values())
        stored = None
        if own is not None:
            stored = await asyncio.to_thread(own.scheduled)
        peak_mb = max(ps.peak_rss_kb, ps.hwm_kb) / 1024 if pid else None

        print()
        print(f"target            {host}:{port}" + (" (own sluice serve, spool on disk, fsync on)" if own else ""))
        print(f"messages          {args.messages}")
        print(f"size              {args.size} bytes")
        print(f"concurrency       {args.concurrency} sessions")
        print(f"reuse             {args.reuse} message(s) per connection"
              + (", pipelining" if args.pipelining else ""))
        print(f"connections       {st.connections}")
        print(f"elapsed           {elapsed:.2f} s")
        print(f"accepted          {st.accepted}")
        print(f"accepted msg/s    {rate:.1f}")
        print(f"MB/s              {mbps:.2f}")
        print(f"errors            {st.errors}")
        for what, k in sorted(st.error_samples.items(), key=lambda kv: -kv[1])[:10]:
            print(f"    {k:>6} x {what}")
        print(f"latency ms        p50 {_pct(st.latencies, 50) * 1e3:.1f}  p90 {_pct(st.latencies, 90) * 1e3:.1f}"
              f"  p99 {_pct(st.latencies, 99) * 1e3:.1f}  max {max(st.latencies, default=0) * 1e3:.1f}"
              "  (MAIL to 250 after DATA)")
        if pid:
            print(f"server peak RSS   {peak_mb:.1f} MB, all processes (sampled peak "
                  f"{ps.peak_rss_kb / 1024:.1f} MB, sum of VmHWM {ps.hwm_kb / 1024:.1f} MB, "
                  f"last {ps.rss_kb / 1024:.1f} MB)")
        if server_cpu is not None:
            main_tid = pid
            per = {tid: ps.threads_end[tid] - ps.threads_start.get(tid, 0.0) for tid in ps.threads_end}
            main = per.get(main_tid, 0.0)
            others = sorted((v for t, v in per.items() if t != main_tid), reverse=True)
            print(f"server CPU        {server_cpu:.1f} s = {server_cpu / elapsed:.2f} cores "
                  f"({len(procs)} process(es))")
            print(f"  main process    {procs.get(pid, 0.0):.1f} s: event-loop thread {main:.1f} s = "
                  f"{main / elapsed:.2f} cores; other threads "
                  f"{', '.join(f'{v:.1f}' for v in others[:4] if v >= 0.05) or '0'} s")
            kids = sorted((v for p, v in procs.items() if p != pid), reverse=True)
            if kids:
                print(f"  child processes {', '.join(f'{v:.1f}' for v in kids)} s")
        print(f"client CPU        {client_cpu:.1f} s = {client_cpu / elapsed:.2f} cores "
              f"(user {ru1.ru_utime - ru0.ru_utime:.1f} s, sys {ru1.ru_stime - ru0.ru_stime:.1f} s)")
        print(f"machine           {busy['busy']:.2f} of {os.cpu_count()} cores busy (user {busy['user']}, "
              f"system {busy['system']}, softirq {busy['softirq']}, iowait {busy['iowait']}, "
              f"steal {busy['steal']})")
        if server_cpu is not None:
            other = busy["busy"] - server_cpu / elapsed - client_cpu / elapsed
            print(f"other load        {other:.2f} cores (machine busy minus server and client:"
                  " other processes, kernel threads)")
        if stored is not None:
            print(f"queued in server  {stored} (scheduled, per /metrics.json)")
        result = {
            "bench": "inject", "messages": args.messages, "size": args.size,
            "concurrency": args.concurrency, "reuse": args.reuse, "pipelining": args.pipelining,
            "elapsed_s": round(elapsed, 3), "accepted": st.accepted, "msg_per_s": round(rate, 1),
            "mb_per_s": round(mbps, 2), "errors": st.errors,
            "p50_ms": round(_pct(st.latencies, 50) * 1e3, 1), "p99_ms": round(_pct(st.latencies, 99) * 1e3, 1),
            "server_peak_rss_mb": round(peak_mb, 1) if peak_mb is not None else None,
            "server_cpu_s": round(server_cpu, 1) if server_cpu is not None else None,
            "client_cpu_s": round(client_cpu, 1), "machine_cores_busy": busy["busy"],
            "steal_cores": busy["steal"], "queued": stored, "nproc": os.cpu_count(),
            "python": sys.version.split()[0],
        }
        if st.errors:
            code = 1
    finally:
        if own is not None:
            exit_code, took = await asyncio.to_thread(own.stop)
            tail = own.log_tail(400)
            problems = [ln for ln in tail.splitlines()
                        if "Traceback" in ln or " ERROR " in ln or "Error" in ln or "exception" in ln.lower()]
            print(f"server stopped    exit {exit_code} after {took:.1f} s"
                  + (f"; {len(problems)} error line(s) in its log" if problems else ""))
            if problems or exit_code not in (0, None):
                print("---- server log (tail) ----\n" + own.log_tail(60) + "\n----", file=sys.stderr)
            if result:
                result["server_exit"] = exit_code
                result["server_log_errors"] = len(problems)
            own.cleanup()
    if result:
        print(_json(result))
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"inject: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
