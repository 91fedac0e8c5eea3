"""Reception in worker processes and delivery in its own ([server] workers):
the guarantees hold across processes."""

from __future__ import annotations

import contextlib
import os
import signal
import smtplib
import subprocess
import time

from ..support import Blaster, SlowPeer, assert_consistent, free_port, wait_for


RECEPTION = "sluice.reception.worker"
DELIVERY = "sluice.delivery.worker"


def children(pid: int, module: str | None = None) -> list[int]:
    """The child processes of ``pid`` (those running ``module``, if given)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    kids = [int(p) for p in out.stdout.split()]
    if module is None:
        return kids
    found = []
    for kid in kids:
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as fh:
                if module.encode() in fh.read().split(b"\0"):
                    found.append(kid)
        except OSError:
            pass
    return found


def held(make_serve, workers: int = 2):
    return make_serve(routes={"example.com": f"127.0.0.1:{free_port()}"},
                      queue='retry_interval = "1h"', workers=workers).start()


def send_each(srv, rcpts: list[str], **kw) -> None:
    for r in rcpts:  # one connection each: the kernel spreads them over the workers
        srv.send([r], **kw)


def test_workers_run_and_stop_with_the_server(make_serve):
    srv = held(make_serve, workers=2)
    kids = children(srv.proc.pid)
    # two reception workers and the delivery process
    assert len(children(srv.proc.pid, RECEPTION)) == 2
    assert len(children(srv.proc.pid, DELIVERY)) == 1
    assert len(kids) == 3
    send_each(srv, [f"u{i}@example.com" for i in range(20)])
    # queue-summary and metrics count what every worker received
    assert sum(srv.scheduled().values()) == 20
    assert "sluice_messages_received_total 20.0" in srv.api("GET", "/metrics").text
    assert srv.stop() == 0
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read()


def test_bounce_rule_in_force_for_mail_from_every_worker_when_the_api_answers(make_serve):
    srv = held(make_serve, workers=2)
    r = srv.api("POST", "/api/admin/bounce/v1", {"domain": "example.com", "reason": "now"})
    assert r.status_code == 200
    send_each(srv, [f"b{i}@example.com" for i in range(20)])
    wait_for(lambda: len(srv.records("AdminBounce")) == 20)
    recs = srv.records("AdminBounce")
    # bounced at reception, never queued
    assert {x["reception_protocol"] for x in recs} == {"ESMTP"}
    assert srv.scheduled() == {}


def test_suspend_in_force_in_every_worker(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}",
                             "marker.example": f"127.0.0.1:{sink.port}"}, workers=2).start()
    sid = srv.kcli("suspend", "--domain", "example.com", "--reason", "hold", check=True).stdout.strip()
    send_each(srv, [f"s{i}@example.com" for i in range(10)])
    # a marker sent after them is delivered: held mail, due before it, was not
    srv.send(["after@marker.example"])
    wait_for(lambda: sink.recipients() == ["after@marker.example"])
    assert srv.scheduled() == {"example.com": 10}
    srv.kcli("suspend-cancel", "--id", sid, check=True)
    wait_for(lambda: len(sink.recipients()) == 11)


def test_a_crashed_worker_is_replaced_and_loses_nothing(make_serve):
    srv = held(make_serve, workers=2)
    send_each(srv, [f"a{i}@example.com" for i in range(10)])
    victim = children(srv.proc.pid, RECEPTION)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in children(srv.proc.pid), timeout=30)  # reaped
    wait_for(lambda: len(children(srv.proc.pid, RECEPTION)) == 2, timeout=30)  # replaced
    # service goes on; nothing acknowledged was lost
    deadline = time.time() + 10
    sent = 0
    while sent < 10 and time.time() < deadline:
        try:
            srv.send([f"b{sent}@example.com"])
            sent += 1
        except (OSError, smtplib.SMTPException):
            time.sleep(0.1)  # a connection that reached the dying worker
    assert sent == 10
    assert sum(srv.scheduled().values()) == 20
    # mail through the new worker is under the rules too
    srv.api("POST", "/api/admin/bounce/v1", {"domain": "example.com", "reason": "after"})
    send_each(srv, [f"c{i}@example.com" for i in range(10)])
    wait_for(lambda: len(srv.records("AdminBounce")) == 30)


def test_single_process_mode(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}, workers=0).start()
    assert children(srv.proc.pid) == []
    srv.send(["one@example.com"])
    wait_for(lambda: sink.recipients() == ["one@example.com"])


def test_a_killed_delivery_process_is_replaced_and_loses_nothing(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}, workers=2).start()
    blaster = Blaster(srv.smtp_port, sessions=10).start()
    wait_for(lambda: len(srv.records("Delivery")) > 100, timeout=30)
    [victim] = children(srv.proc.pid, DELIVERY)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: children(srv.proc.pid, DELIVERY) not in ([], [victim]), timeout=20)
    delivered = len(srv.records("Delivery"))
    wait_for(lambda: len(srv.records("Delivery")) > delivered + 20, timeout=30)  # the new one sends
    acked = blaster.stop()
    wait_for(lambda: srv.scheduled() == {}, timeout=60)
    terminal = assert_consistent(srv, acked)
    # every acknowledged message was delivered, and logged once
    assert all(terminal.get(i) == {"Delivery"} for i in acked)
    ids = [r["id"] for r in srv.records("Delivery")]
    assert len(ids) == len(set(ids))
    assert {r["recipient"] for r in srv.records("Delivery")} <= set(sink.recipients())
    assert srv.stop() == 0


def test_ready_queue_figures_come_from_the_delivery_process(make_serve):
    peer = SlowPeer(greet_delay=3.0).start()
    try:
        srv = make_serve(routes={"example.com": f"127.0.0.1:{peer.port}"}, workers=1).start()
        srv.send(["slow@example.com"])
        site = f"127.0.0.1:{peer.port}"
        ready = wait_for(lambda: srv.api("GET", "/metrics.json").json()["ready"].get(site))
        assert ready["queued"] == 1 and ready["connections"] == 1
        text = srv.api("GET", "/metrics").text
        assert f'sluice_connections{{site="{site}"}} 1.0' in text
        wait_for(lambda: srv.records("Delivery"))
        assert srv.api("GET", "/metrics.json").json()["ready"][site]["delivered"] == 1
    finally:
        peer.stop()


def test_rules_reach_a_stalled_delivery_process_or_it_is_replaced(make_serve):
    """The API does not answer before the delivery process has the rule: one that
    cannot take it (stopped here with SIGSTOP) is killed and replaced first."""
    peer = SlowPeer(greet_delay=0.0).start()
    try:
        srv = make_serve(routes={"example.com": f"127.0.0.1:{peer.port}"}, workers=1).start()
        [victim] = children(srv.proc.pid, DELIVERY)
        os.kill(victim, signal.SIGSTOP)
        try:
            srv.send([f"r{i}@example.com" for i in range(5)], headers={"X-Campaign": "stop"})
            r = srv.api("POST", "/api/admin/bounce/v1", {"campaign": "stop", "reason": "stalled"})
            assert r.status_code == 200
            # gone (killed and reaped) by the time the API answered
            assert not os.path.exists(f"/proc/{victim}")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        wait_for(lambda: len(srv.records("AdminBounce")) == 5, timeout=30)
        assert peer.data_received == []
        assert not srv.records("Delivery")
        wait_for(lambda: len(children(srv.proc.pid, DELIVERY)) == 1)
    finally:
        peer.stop()
