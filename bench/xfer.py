#!/usr/bin/env python3
"""xfer throughput: move ``-n`` (100,000) queued messages from one node to another.

Starts two ``sluice serve`` nodes (free 127.0.0.1 ports, throw-away data
directories, default workers), writes ``-n`` queued messages of ``--size``
(2,000) bytes, each with its own body, into the source's spool while it is
stopped (due in an hour, so nothing is delivered meanwhile), then POSTs an
xfer of everything to the target. The figure is the time from the POST to
the moment the source lists the xfer ``done``: every message stored and
fsync'd by the target, deleted from the source, each with its AdminRebind
record committed. Aim: at least 2,000 msg/s. Checks that the target holds
all ``-n``.

    .venv/bin/python bench/xfer.py
    .venv/bin/python bench/xfer.py -n 20000 --size 10000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_rules import BIN, free_port, wait_http  # noqa: E402


class Node:
    def __init__(self, tmp: Path, name: str) -> None:
        self.data = tmp / name
        self.http = free_port()
        self.url = f"http://127.0.0.1:{self.http}"
        self.config = tmp / f"{name}.toml"
        self.log = tmp / f"{name}.log"
        self.config.write_text(f'[server]\ndata_dir = "{self.data}"\nnode_name = "{name}"\n'
                               f'[smtp]\nlisten = ["127.0.0.1:{free_port()}"]\n'
                               'hostname = "bench.example"\n'
                               f'[http]\nlisten = ["127.0.0.1:{self.http}"]\n'
                               '[queue]\nretry_interval = "1h"\n')
        self.proc: subprocess.Popen | None = None

    def start(self) -> Node:
        self.proc = subprocess.Popen([str(BIN / "sluice"), "serve", "--config", str(self.config)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        wait_http(self.url, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def fill(db: Path, n: int, size: int) -> None:
    conn = sqlite3.connect(db)
    now = time.time()
    conn.execute("INSERT OR IGNORE INTO queues VALUES ('example.com', 'example.com', NULL, NULL,"
                 " NULL)")
    pad = b"x" * 76 + b"\r\n"
    for start in range(0, n, 10000):
        rows = []
        for i in range(start, min(n, start + 10000)):
            head = f"Subject: message {i}\r\nTo: <r{i}@example.com>\r\n\r\n".encode()
            body = head + pad * max(0, (size - len(head)) // len(pad))
            body_id = conn.execute("INSERT INTO bodies(data, refs) VALUES (?, 1)",
                                   (body,)).lastrowid
            rows.append((f"{i:032x}", f"r{i}@example.com", body_id, len(body), now - 600,
                         now + 3600))
        conn.executemany(
            "INSERT INTO messages(id, queue, sender, recipient, body_id, size, created, due,"
            " attempts, state, protocol) VALUES (?, 'example.com', 'bench@example.org', ?, ?,"
            " ?, ?, ?, 1, 0, 'ESMTP')", rows)
    conn.commit()
    conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=100_000, help="messages (100,000)")
    ap.add_argument("--size", type=int, default=2000, help="bytes per message (2,000)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sluice-xfer-"))
    source, target = Node(tmp, "source"), Node(tmp, "target")
    try:
        source.start().stop()  # makes the spool
        fill(source.data / "spool" / "spool.db", args.n, args.size)
        source.start()
        target.start()
        with httpx.Client(timeout=60) as client:
            queued = client.get(source.url + "/metrics.json").json()["scheduled"]
            if queued != {"example.com": args.n}:
                raise RuntimeError(f"source holds {queued}")
            t0 = time.perf_counter()
            r = client.post(source.url + "/api/admin/xfer/v1",
                            json={"target": target.url, "reason": "bench"})
            if r.status_code != 200:
                raise RuntimeError(f"xfer: {r.status_code} {r.text}")
            while True:
                [row] = client.get(source.url + "/api/admin/xfer/v1").json()
                if row["state"] == "done":
                    break
                time.sleep(0.02)
            elapsed = time.perf_counter() - t0
            held = client.get(target.url + "/metrics.json").json()["scheduled"]
        if row["moved"] != args.n or held != {"example.com": args.n}:
            raise RuntimeError(f"moved {row['moved']}, target holds {held}")
    finally:
        source.stop()
        target.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    rate = args.n / elapsed
    print(f"xfer {args.n:,} messages of {args.size:,} bytes: {elapsed:.2f} s, {rate:,.0f} msg/s "
          f"(aim >= 2,000 msg/s: {'met' if rate >= 2000 else 'NOT met'}; cores: {os.cpu_count()})")
    print(json.dumps({"bench": "xfer", "n": args.n, "size": args.size,
                      "seconds": round(elapsed, 2), "msg_per_s": round(rate)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
