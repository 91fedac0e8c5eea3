#!/usr/bin/env python3
"""Traffic shaping benchmark: does a destination see the configured rate?

Starts its own ``sluice serve`` (from the same virtualenv; free 127.0.0.1
ports, a throw-away data directory) with

    [shaping."bench.example"]
    max_message_rate = "50/s"
    max_connections = 5

and ``bench.example`` routed to a ``sluice sink --stats`` subprocess, which
counts the connections it has open at once and the messages it accepts each
second. It injects enough mail over SMTP first (by default what the rate
drains in the measured time plus 20 s), quickly, then measures for
``--seconds`` (60): the sink's message rate over that window, from its
per-second counts (the first and the last partial seconds left out), and
its peak connections over the whole run. The aim: the rate within 5% of the
configured one, never more connections than allowed. Prints the figures,
whether they meet the aim, and one JSON line.

    .venv/bin/python bench/shaping.py                # 60 s
    .venv/bin/python bench/shaping.py --seconds 10   # a smoke run
    .venv/bin/python bench/shaping.py --nodes 3 --shared --rate 100/s
        # three nodes in a cluster (a private redis-server) holding 100/s together

With ``--nodes N`` every node sends to the same sink and the mail is
injected into all of them; with ``--shared`` the rate holds for the nodes
together (``shared = true``), otherwise for each (the aim is then N times
the rate). Connections are per node: the aim is N x ``max_connections``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DOMAIN = "bench.example"
BIN = Path(sys.executable).parent
UNITS = {"s": 1, "m": 60, "h": 3600}


def per_second(rate: str) -> float:
    """``"50/s"``, ``"1000/m"``, ``"20000/h"`` -> messages per second."""
    n, _, unit = rate.partition("/")
    return float(n) / UNITS[unit.strip()[:1]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_smtp(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer on port {port} within {timeout:.0f} s")


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def stop(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def inject(port: int, count: int, sessions: int, per_message: int) -> float:
    """``count`` messages to ``bench.example`` (``per_message`` recipients per
    transaction, each a message of its own) over ``sessions`` SMTP sessions
    at once; returns the seconds it took."""
    body = (b"From: <bench@bench-client.example>\r\nTo: <x@bench.example>\r\n"
            b"Subject: shaping benchmark\r\n\r\n" + b"x" * 76 + b"\r\n")
    recipients = [f"user{i}@{DOMAIN}" for i in range(count)]
    errors: list[str] = []

    def run(share: list[str]) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
                for k in range(0, len(share), per_message):
                    s.sendmail("bench@bench-client.example", share[k:k + per_message], body)
        except (OSError, smtplib.SMTPException) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(recipients[k::sessions],))
               for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"injection failed ({len(errors)} sessions): {errors[0]}")
    return time.monotonic() - t0


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def ready_figures(http_port: int) -> dict:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{http_port}/metrics.json", timeout=10).json()
    except Exception:
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured time (60)")
    ap.add_argument("--rate", default="50/s", help="max_message_rate of the site (50/s)")
    ap.add_argument("--connections", type=int, default=5, help="max_connections (5)")
    ap.add_argument("-n", "--messages", type=int, default=None,
                    help="messages to inject (default: the rate times the seconds plus 20 s)")
    ap.add_argument("--sessions", type=int, default=20, help="SMTP sessions injecting at once")
    ap.add_argument("--workers", type=int, default=None,
                    help="[server] workers (default: the server's, one per core)")
    ap.add_argument("--nodes", type=int, default=1,
                    help="sluice serve nodes sending to the sink (1); with more than one, a "
                         "redis-server joins them in a cluster")
    ap.add_argument("--shared", action="store_true",
                    help="shared = true: the rate holds for the cluster, not per node")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temp dir goes")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    rate = per_second(args.rate)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-shaping-", dir=args.workdir))
    sink_port = free_port()
    clustered = args.nodes > 1 or args.shared
    redis_port = free_port() if clustered else None
    # the rate every node together is held to: the configured one when
    # shared, else the configured one per node
    aim = rate if args.shared else rate * args.nodes
    count = args.messages or math.ceil(aim * (args.seconds + 20))
    stats = tmp / "sink-stats.json"
    nodes = []
    for i in range(args.nodes):
        smtp_port, http_port = free_port(), free_port()
        config = tmp / f"sluice-{i}.toml"
        config.write_text(
            "[server]\n"
            f'data_dir = "{tmp / f"data-{i}"}"\n'
            f'node_name = "bench-{i}"\n'
            + (f"workers = {args.workers}\n" if args.workers is not None else "")
            + "[smtp]\n"
            f'listen = ["127.0.0.1:{smtp_port}"]\n'
            'hostname = "sluice-bench.example"\n'
            "[http]\n"
            f'listen = ["127.0.0.1:{http_port}"]\n'
            + (f'[cluster]\nredis_url = "redis://127.0.0.1:{redis_port}/0"\n' if clustered else "")
            + "[routes]\n"
            f'"{DOMAIN}" = "127.0.0.1:{sink_port}"\n'
            f'[shaping."{DOMAIN}"]\n'
            f'max_message_rate = "{args.rate}"\n'
            f"max_connections = {args.connections}\n"
            + ("shared = true\n" if args.shared else ""))
        nodes.append((config, smtp_port, http_port))
    sink = redis = None
    servers: list[subprocess.Popen] = []
    try:
        if clustered:
            redis = subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(tmp)],
                stdout=open(tmp / "redis.log", "wb"), stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL)
            wait_port(redis_port, redis, "redis-server")
        sink = subprocess.Popen(
            [str(BIN / "sluice"), "sink", "--listen", f"127.0.0.1:{sink_port}",
             "--stats", str(stats)],
            stdout=open(tmp / "sink.log", "wb"), stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        wait_smtp(sink_port, sink, "sluice sink")
        for i, (config, smtp_port, _) in enumerate(nodes):
            servers.append(subprocess.Popen(
                [str(BIN / "sluice"), "serve", "--config", str(config)],
                stdout=open(tmp / f"server-{i}.log", "wb"), stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL))
            wait_smtp(smtp_port, servers[-1], "sluice serve")

        print(f"injecting {count} messages to {DOMAIN} over {args.sessions} sessions per node, "
              f"{args.nodes} node(s) (max_message_rate {args.rate}"
              f"{' shared by the cluster' if args.shared else ''}, "
              f"max_connections {args.connections})", flush=True)
        t0 = time.perf_counter()
        share = [count // args.nodes + (1 if i < count % args.nodes else 0)
                 for i in range(args.nodes)]
        threads = [threading.Thread(target=inject, args=(smtp_port, n, args.sessions, 10))
                   for (_, smtp_port, _), n in zip(nodes, share)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
        print(f"injected in {took:.1f} s; measuring for {args.seconds:g} s", flush=True)
        t_start = time.time()
        time.sleep(args.seconds)
        t_end = time.time()
        left_by_node = [ready_figures(http_port) for _, _, http_port in nodes]
        time.sleep(1.5)  # the sink rewrites its figures every second
        figures = read_json(stats)
        if not figures:
            raise RuntimeError(f"no figures from the sink in {stats}")
    finally:
        for server in servers:
            stop(server)
        stop(sink)
        stop(redis)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    counts = {int(k): v for k, v in figures["per_second"].items()}
    window = range(math.ceil(t_start), math.floor(t_end))  # whole seconds only
    in_window = [counts.get(s, 0) for s in window]
    measured = sum(in_window) / len(in_window) if in_window else 0.0
    peak_1s = max(in_window, default=0)
    peak_conns = figures["peak_connections"]
    still_queued = sum(sum(left.get("scheduled", {}).values())  # not delivered yet
                       for left in left_by_node)
    rate_ok = abs(measured - aim) <= 0.05 * aim
    conns_ok = peak_conns <= args.connections * args.nodes  # connections are per node
    supplied = still_queued > 0

    print(f"rate over {len(in_window)} whole seconds: {measured:.2f}/s "
          f"(aim {aim:g}/s: {rate:g}/s {'for the cluster' if args.shared else 'per node'}, "
          f"{args.nodes} node(s); {100 * (measured - aim) / aim:+.1f}%): "
          f"{'meets' if rate_ok else 'MISSES'} the aim (within 5%)")
    print(f"busiest second: {peak_1s} messages")
    print(f"peak connections at the sink: {peak_conns} (max_connections {args.connections} "
          f"per node): "
          f"{'meets' if conns_ok else 'MISSES'} the aim")
    print(f"mail still queued at the end of the window: {still_queued}"
          + ("" if supplied else " (the queue ran dry: the rate is not a measure of the limit;"
                                 " inject more with -n)"))
    print(json.dumps({
        "bench": "shaping", "configured_rate": rate, "nodes": args.nodes, "shared": args.shared,
        "aim_rate": aim, "max_connections": args.connections,
        "seconds": len(in_window), "messages": count, "inject_seconds": round(took, 2),
        "rate": round(measured, 3), "peak_rate_1s": peak_1s, "peak_connections": peak_conns,
        "still_queued": still_queued, "rate_ok": rate_ok, "connections_ok": conns_ok,
        "ok": rate_ok and conns_ok and supplied,
    }))
    return 0 if rate_ok and conns_ok and supplied else 1


if __name__ == "__main__":
    sys.exit(main())
