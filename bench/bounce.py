#!/usr/bin/env python3
"""Admin bounce benchmark: sweep a spool of 1,000,000 queued messages.

1. Fills a fresh spool on disk directly (SQLite, same schema the server
   uses) with N messages of 1 KB over 10 campaigns x 10 tenants x 10
   domains = 1,000 queues, all waiting for a retry an hour away; 1% of
   them come from a compromised sender (``*@compromised.example``).
2. Starts ``sluice serve`` on it and reads its RSS with everything queued.
3. Measures the SMTP accept rate while idle (10 KB, 50 sessions, to a
   suspended domain so the figure is acceptance only).
4. Bounces the compromised sender's mail (per-message criteria: 1% of N,
   spread over every queue), then one campaign (N/10 messages), restores
   that campaign, then bounces everything, each while the same SMTP load
   runs; prints the seconds from the POST to the last AdminBounce (or
   AdminRestore) record written to the log files, and the accept rate
   during the sweep against the idle rate.

    .venv/bin/python bench/bounce.py                     # 1,000,000 messages
    .venv/bin/python bench/bounce.py -n 100000           # quicker
    .venv/bin/python bench/bounce.py --retention 0s      # nothing kept for restores
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inject import Injector, free_port, process_tree  # noqa: E402

from sluice.spool.base import new_message_id  # noqa: E402
from sluice.spool.sqlite import _SCHEMA  # noqa: E402

CAMPAIGNS = [f"campaign{i}" for i in range(10)]
TENANTS = [f"tenant{i}" for i in range(10)]
DOMAINS = [f"dest{i}.example" for i in range(10)]
ACCEPT_DOMAIN = "bench.example"  # the inject benchmark's domain
COMPROMISED = "spammer@compromised.example"  # the sender of 1 message in 100


def fill(db: Path, total: int) -> float:
    """Write ``total`` queued messages straight into a new spool; returns seconds."""
    t0 = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    queues = [(c, t, d) for c in CAMPAIGNS for t in TENANTS for d in DOMAINS]
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO queues VALUES (?, ?, ?, ?, NULL)",
                     [(f"{c}:{t}@{d}", d, c, t) for c, t, d in queues])
    conn.execute("COMMIT")
    now = time.time()
    due = now + 3600
    pad = b"x" * 900
    batch = 50_000
    for start in range(0, total, batch):
        n = min(batch, total - start)
        conn.execute("BEGIN")
        first = conn.execute("SELECT coalesce(max(id), 0) FROM bodies").fetchone()[0] + 1
        bodies, msgs = [], []
        for k in range(n):
            i = start + k
            c, t, d = queues[i % len(queues)]
            body = (f"From: sender@bench.example\r\nTo: user{i}@{d}\r\nSubject: message {i}\r\n"
                    f"X-Campaign: {c}\r\nX-Tenant: {t}\r\n\r\n").encode() + pad
            body = body[:1024]
            bodies.append((first + k, body, 1))
            sender = COMPROMISED if i % 100 == 99 else "sender@bench.example"
            msgs.append((new_message_id(f"{c}:{t}@{d}"), f"{c}:{t}@{d}", sender,
                         f"user{i}@{d}", first + k, len(body), now, due, 1))
        conn.executemany("INSERT INTO bodies(id, data, refs) VALUES (?, ?, ?)", bodies)
        conn.executemany(
            "INSERT INTO messages(id, queue, sender, recipient, body_id, size, created, due, attempts)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", msgs)
        conn.execute("COMMIT")
        print(f"  filled {start + n:>9}", file=sys.stderr, flush=True)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - t0


class LogCounter:
    """Counts records of one type (AdminBounce) as they land in the JSONL files."""

    def __init__(self, logs: Path, kind: str = "AdminBounce") -> None:
        self.NEEDLE = b'"type":"%s"' % kind.encode()
        self.logs = logs
        self.offsets: dict[Path, int] = {}
        self.count = 0

    def poll(self) -> int:
        if self.logs.exists():
            for path in sorted(self.logs.glob("*.jsonl")):
                off = self.offsets.get(path, 0)
                with open(path, "rb") as fh:
                    fh.seek(off)
                    data = fh.read()
                end = data.rfind(b"\n") + 1  # whole lines only
                self.count += data[:end].count(self.NEEDLE)
                self.offsets[path] = off + end
        return self.count


def rss_mb(pid: int) -> float:
    """RSS of the server: its main process and its reception and delivery processes."""
    total = 0.0
    for p in process_tree(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
    return total


async def accept_load(port: int, stop: asyncio.Event, size: int, concurrency: int) -> tuple[int, float, int]:
    """Send until ``stop`` is set; returns (accepted, seconds, errors)."""
    inj = Injector("127.0.0.1", port, n=10**9, size=size, concurrency=concurrency, reuse=1,
                   pipelining=False, timeout=60.0)
    t0 = time.perf_counter()
    run = asyncio.create_task(inj.run(progress=0))
    await stop.wait()
    inj.n = inj.next  # no new messages; those under way finish
    await run
    return inj.stats.accepted, time.perf_counter() - t0, inj.stats.errors


async def bounce_and_measure(http: str, port: int, logs: LogCounter, body: dict, swept,
                             size: int, concurrency: int) -> dict:
    """POST a bounce while SMTP load runs; done when ``swept(scheduled, rule)``
    holds and every message the rule bounced has its record in the log files."""
    before = logs.poll()
    stop = asyncio.Event()
    load = asyncio.create_task(accept_load(port, stop, size, concurrency))
    await asyncio.sleep(1.0)  # load is running before the POST
    async with httpx.AsyncClient(timeout=60) as client:
        t0 = time.perf_counter()
        r = await client.post(f"{http}/api/admin/bounce/v1", json=body)
        t_answer = time.perf_counter() - t0
        r.raise_for_status()
        rule_id = r.json()["id"]

        async def rule() -> dict:
            rules = (await client.get(f"{http}/api/admin/bounce/v1")).json()
            return next(e for e in rules if e["id"] == rule_id)

        while not swept((await client.get(f"{http}/metrics.json")).json()["scheduled"],
                        await rule()):
            await asyncio.sleep(0.1)
        t_swept = time.perf_counter() - t0
        stop.set()
        accepted, seconds, errors = await load
        total = (await rule())["total_bounced"]
        while logs.poll() - before < total:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
    return {"bounced": logs.count - before, "seconds": elapsed, "swept_s": t_swept,
            "api_answer_s": t_answer, "accepted": accepted, "accept_seconds": seconds,
            "accept_errors": errors, "rule_id": rule_id}


async def restore_and_measure(http: str, logs: LogCounter, rule_id: str) -> dict:
    """POST a restore; done when every restored message has its AdminRestore record."""
    before = logs.poll()
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        r = await client.post(f"{http}/api/admin/bounce/v1/restore", json={"id": rule_id})
        t_answer = time.perf_counter() - t0
        r.raise_for_status()
        total = r.json()["total_restored"]
        while logs.poll() - before < total:
            await asyncio.sleep(0.05)
    return {"restored": total, "seconds": time.perf_counter() - t0, "api_answer_s": t_answer,
            "unavailable": r.json()["unavailable"]}


async def idle_rate(port: int, seconds: float, size: int, concurrency: int) -> float:
    stop = asyncio.Event()
    task = asyncio.create_task(accept_load(port, stop, size, concurrency))
    await asyncio.sleep(seconds)
    stop.set()
    accepted, elapsed, _ = await task
    return accepted / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--messages", type=int, default=1_000_000)
    ap.add_argument("--accept-size", type=int, default=10240)
    ap.add_argument("-c", "--concurrency", type=int, default=50)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    ap.add_argument("--retention", default="1h",
                    help="[admin] bounce_retention (1h, the default; 0s: nothing kept)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sluice-bounce-", dir=args.workdir))
    data = work / "var"
    (data / "spool").mkdir(parents=True)
    smtp, http_port, dead = free_port(), free_port(), free_port()
    routes = "\n".join(f'"{d}" = "127.0.0.1:{dead}"' for d in [*DOMAINS, ACCEPT_DOMAIN])
    config = work / "sluice.toml"
    config.write_text(f"""
[server]
data_dir = "{data}"
[smtp]
listen = ["127.0.0.1:{smtp}"]
[http]
listen = ["127.0.0.1:{http_port}"]
[queue]
retry_interval = "1h"
[admin]
bounce_retention = "{args.retention}"
[routes]
{routes}
""")
    http = f"http://127.0.0.1:{http_port}"
    proc = None
    try:
        print(f"filling {args.messages} messages into {data / 'spool'} ...", file=sys.stderr)
        fill_s = fill(data / "spool" / "spool.db", args.messages)
        t0 = time.perf_counter()
        proc = subprocess.Popen([Path(sys.executable).parent / "sluice", "serve", "--config", str(config)],
                                stdout=open(work / "serve.out", "wb"), stderr=subprocess.STDOUT)
        while True:
            try:
                if httpx.get(f"{http}/api/check-liveness/v1", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError((work / "serve.out").read_text())
            time.sleep(0.1)
        start_s = time.perf_counter() - t0
        scheduled = sum(httpx.get(f"{http}/metrics.json").json()["scheduled"].values())
        rss_queued = rss_mb(proc.pid)
        httpx.post(f"{http}/api/admin/suspend/v1",
                   json={"domain": ACCEPT_DOMAIN, "reason": "bench", "duration": "1h"}).raise_for_status()

        logs = LogCounter(data / "logs")
        idle = asyncio.run(idle_rate(smtp, args.idle_seconds, args.accept_size, args.concurrency))
        compromised = args.messages // 100
        sender = asyncio.run(bounce_and_measure(
            http, smtp, logs, {"sender": "*@compromised.example", "reason": "bench: one sender"},
            lambda sched, rule: rule["total_bounced"] >= compromised,
            args.accept_size, args.concurrency))
        camp = asyncio.run(bounce_and_measure(
            http, smtp, logs, {"campaign": "campaign0", "reason": "bench: one campaign"},
            lambda sched, rule: not any(q.startswith("campaign0:") for q in sched),
            args.accept_size, args.concurrency))
        restore = asyncio.run(restore_and_measure(http, LogCounter(data / "logs", "AdminRestore"),
                                                  camp["rule_id"]))
        rest = asyncio.run(bounce_and_measure(
            http, smtp, logs, {"reason": "bench: everything"}, lambda sched, rule: not sched,
            args.accept_size, args.concurrency))
        rss_after = rss_mb(proc.pid)
        left = sum(httpx.get(f"{http}/metrics.json").json()["scheduled"].values())
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    print()
    print(f"spool: {args.messages} messages x 1 KB, {len(CAMPAIGNS) * len(TENANTS) * len(DOMAINS)} queues"
          f" (filled in {fill_s:.1f} s; server ready {start_s:.1f} s after start)")
    print(f"scheduled at start       {scheduled}")
    print(f"server RSS, all queued   {rss_queued:.0f} MB   (after the sweeps: {rss_after:.0f} MB)")
    print(f"idle accept rate         {idle:.0f} msg/s  ({args.accept_size} B, {args.concurrency} sessions)")
    print(f"retention                {args.retention}")
    for name, r in (("one sender (1%)", sender), ("one campaign", camp), ("everything", rest)):
        rate = r["accepted"] / r["accept_seconds"]
        print(f"bounce {name:<16}  {r['bounced']} AdminBounce records in {r['seconds']:.1f} s "
              f"({r['bounced'] / r['seconds']:.0f}/s; spool empty of them after {r['swept_s']:.1f} s;"
              f" API answered in {r['api_answer_s'] * 1000:.0f} ms)")
        print(f"  accept rate meanwhile  {rate:.0f} msg/s = {rate / idle:.2f} x idle "
              f"({r['accept_errors']} errors)")
        if r is camp:
            print(f"restore that campaign    {restore['restored']} AdminRestore records in "
                  f"{restore['seconds']:.1f} s ({restore['restored'] / restore['seconds']:.0f}/s; "
                  f"API answered in {restore['api_answer_s']:.1f} s; "
                  f"{restore['unavailable']} unavailable)")
    print(f"left in the spool        {left}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
