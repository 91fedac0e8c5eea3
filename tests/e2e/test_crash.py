"""kill -9 at the worst moments: nothing acknowledged is lost, no message ends twice.

After each crash the server is restarted on the same spool and checked from
the client's side (every 250 it got) and from the logs' side (every record
is whole JSON; each message has at most one terminal type, and a message
that got both Delivery and AdminBounce would fail the test).
"""

from __future__ import annotations

import smtplib
import time

from ..support import Blaster, assert_consistent, free_port, terminal_by_id, wait_for


def test_kill_during_injection(make_serve):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{free_port()}"},
                     queue='retry_interval = "1h"').start()
    blaster = Blaster(srv.smtp_port, sessions=20).start()
    wait_for(lambda: len(blaster.acked) > 200, timeout=30)
    srv.kill()
    acked = blaster.stop()
    srv.start()
    assert_consistent(srv, acked)
    # messages never tried before the kill are tried (and fail) first
    wait_for(lambda: sum(srv.scheduled().values()) >= len(acked), timeout=60)
    for msg_id in acked[-20:]:  # the last acknowledged ones are the most at risk
        assert srv.api("GET", f"/api/admin/inspect-message/v1?id={msg_id}").status_code == 200


def test_kill_during_deliveries(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    blaster = Blaster(srv.smtp_port, sessions=10).start()
    wait_for(lambda: len(srv.records("Delivery")) > 100, timeout=30)
    srv.kill()
    acked = blaster.stop()
    srv.start()
    wait_for(lambda: srv.scheduled() == {}, timeout=60)
    terminal = assert_consistent(srv, acked)
    assert all(terminal.get(i) == {"Delivery"} for i in acked), "an acknowledged message never ended"
    # at least once: every acknowledged message reached the sink
    got = set(sink.recipients())
    delivered_to = {r["recipient"] for r in srv.records("Delivery")}
    assert delivered_to <= got


def test_kill_during_bounce_sweep(make_serve):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{free_port()}"},
                     queue='retry_interval = "1h"').start()
    total = 40000
    with smtplib.SMTP("127.0.0.1", srv.smtp_port, timeout=30) as s:
        for batch in range(total // 400):
            s.sendmail("bulk@example.org", [f"b{batch}r{i}@example.com" for i in range(400)],
                       b"Subject: bulk\r\n\r\n" + b"y" * 500 + b"\r\n")
    assert sum(srv.scheduled().values()) == total
    r = srv.api("POST", "/api/admin/bounce/v1", {"domain": "example.com", "reason": "crash",
                                                 "duration": "1h"})
    rule_id = r.json()["id"]
    # kill -9 once the sweep is under way and before it is done
    left = wait_for(lambda: (n := sum(srv.scheduled().values())) < total and n, timeout=10,
                    interval=0.002)
    srv.kill()
    assert 0 < left < total
    srv.start()
    assert [e["id"] for e in srv.api("GET", "/api/admin/bounce/v1").json()] == [rule_id]
    wait_for(lambda: srv.scheduled() == {}, timeout=60)
    wait_for(lambda: len({r["id"] for r in srv.records("AdminBounce")}) == total, timeout=30)
    terminal = terminal_by_id(srv)
    assert len(terminal) == total and all(t == {"AdminBounce"} for t in terminal.values())
    assert srv.api("GET", "/api/admin/bounce/v1").json()[0]["total_bounced"] >= left
