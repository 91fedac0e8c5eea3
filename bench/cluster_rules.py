#!/usr/bin/env python3
"""Rule propagation over a cluster: from the POST to the last confirmation.

Starts a private ``redis-server`` and ``--nodes`` (3) ``sluice serve``
nodes joined through it (free 127.0.0.1 ports, throw-away data
directories), then creates and cancels ``-n`` (200) suspensions on the
first node, one after the other. Each create answers once every live node
has confirmed the rule is in force (the answer's ``nodes``); the figure is
the time from sending the POST to receiving that answer, reported as p50,
p90, p99 and max, for creates and cancels apart. Aim (loopback): p99 under
50 ms. Every answer must list every node as "confirmed".

    .venv/bin/python bench/cluster_rules.py
    .venv/bin/python bench/cluster_rules.py --nodes 3 -n 500
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/api/check-liveness/v1", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("-n", type=int, default=200, help="rules created and cancelled (200)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sluice-cluster-"))
    redis_port = free_port()
    procs: list[subprocess.Popen] = []
    urls = []
    try:
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        for i in range(args.nodes):
            http = free_port()
            config = tmp / f"node-{i}.toml"
            config.write_text(f'[server]\ndata_dir = "{tmp / f"data-{i}"}"\n'
                              f'node_name = "node-{i}"\n'
                              f'[smtp]\nlisten = ["127.0.0.1:{free_port()}"]\n'
                              'hostname = "bench.example"\n'
                              f'[http]\nlisten = ["127.0.0.1:{http}"]\n'
                              f'[cluster]\nredis_url = "redis://127.0.0.1:{redis_port}/0"\n')
            procs.append(subprocess.Popen([str(BIN / "sluice"), "serve", "--config", str(config)],
                                          stdout=open(tmp / f"node-{i}.log", "wb"),
                                          stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{http}")
            wait_http(urls[-1], procs[-1])
        time.sleep(3)  # every node's heartbeat is in
        creates, cancels = [], []
        with httpx.Client(base_url=urls[0], timeout=30) as client:
            for i in range(args.n):
                t0 = time.perf_counter()
                r = client.post("/api/admin/suspend/v1", json={
                    "domain": f"d{i}.example", "reason": "bench", "duration": "1h"})
                creates.append(time.perf_counter() - t0)
                body = r.json()
                if r.status_code != 200 or set(body["nodes"].values()) != {"confirmed"} \
                        or len(body["nodes"]) != args.nodes:
                    raise RuntimeError(f"create {i}: {r.status_code} {body}")
                t0 = time.perf_counter()
                r = client.request("DELETE", "/api/admin/suspend/v1", json={"id": body["id"]})
                cancels.append(time.perf_counter() - t0)
                if r.status_code != 200 or set(r.json()["nodes"].values()) != {"confirmed"}:
                    raise RuntimeError(f"cancel {i}: {r.status_code} {r.text}")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    out: dict = {"bench": "cluster_rules", "nodes": args.nodes, "n": args.n}
    for name, values in (("create", creates), ("cancel", cancels)):
        ms = [v * 1000 for v in values]
        figures = {"p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99), "max": max(ms),
                   "mean": statistics.fmean(ms)}
        out[name] = {k: round(v, 2) for k, v in figures.items()}
        print(f"{name:6}  p50 {figures['p50']:6.2f} ms  p90 {figures['p90']:6.2f} ms  "
              f"p99 {figures['p99']:6.2f} ms  max {figures['max']:6.2f} ms  "
              f"(aim p99 < 50 ms: {'met' if figures['p99'] < 50 else 'NOT met'})")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
