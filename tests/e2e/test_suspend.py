"""Suspend (hold without bouncing), end to end."""

from __future__ import annotations

import datetime as dt

import pytest

from ..support import wait_for


@pytest.mark.parametrize("workers", [None, 0], ids=["default", "workers0"])
def test_suspend_holds_then_cancel_delivers_promptly(make_serve, sink, workers):
    # retry_interval 1h: mail delivered within the test was not waiting for a retry
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"},
                     queue='retry_interval = "1h"', workers=workers).start()
    out = srv.kcli("suspend", "--campaign", "hold-me", "--reason", "checking", "--duration", "10m")
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip()
    srv.send(["a@example.com", "b@example.com"], headers={"X-Campaign": "hold-me"})
    # a marker sent after them is delivered: held mail, due before it, was not
    srv.send(["free@example.com"], headers={"X-Campaign": "other"})
    wait_for(lambda: sink.recipients() == ["free@example.com"])
    assert srv.scheduled() == {"hold-me:@example.com": 2}
    assert not srv.records("TransientFailure")  # held, not attempted

    listed = srv.kcli("suspend-list", "--json")
    assert '"reason": "checking"' in listed.stdout and sid in listed.stdout
    table = srv.kcli("suspend-list").stdout
    assert "campaign=hold-me" in table

    assert srv.kcli("suspend-cancel", "--id", sid).returncode == 0
    wait_for(lambda: len(sink.recipients()) == 3)
    assert {r["num_attempts"] for r in srv.records("Delivery")} == {1}  # no retry was needed
    assert srv.scheduled() == {}
    assert srv.api("GET", "/api/admin/suspend/v1").json() == []


def test_suspension_expires_by_itself(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    ends = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)
    r = srv.api("POST", "/api/admin/suspend/v1",
                {"domain": "example.com", "reason": "short", "expires": ends.isoformat()})
    assert r.status_code == 200 and set(r.json()) == {"id"}
    srv.send(["a@example.com"])
    wait_for(lambda: sink.recipients() == ["a@example.com"], timeout=10)
    # held until the suspension ended, then delivered without a retry
    # the log writer may lag the sink
    [delivered] = wait_for(lambda: srv.records("Delivery"))
    assert dt.datetime.fromisoformat(delivered["event_time"]) >= ends
    assert delivered["num_attempts"] == 1


def test_bounce_during_suspension_removes_held_mail(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    srv.kcli("suspend", "--tenant", "acme", "--reason", "hold", check=True)
    srv.send(["a@example.com", "b@example.com"], headers={"X-Tenant": "acme"})
    wait_for(lambda: srv.scheduled() == {"acme@example.com": 2})
    srv.kcli("bounce", "--tenant", "acme", "--reason", "cancel it", check=True)
    wait_for(lambda: len(srv.records("AdminBounce")) == 2)
    assert srv.scheduled() == {}
    assert sink.recipients() == []


def test_suspension_survives_restart(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}",
                             "marker.example": f"127.0.0.1:{sink.port}"}).start()
    sid = srv.kcli("suspend", "--domain", "example.com", "--reason", "r", "--duration", "1h",
                   check=True).stdout.strip()
    srv.send(["a@example.com"])
    assert srv.stop() == 0
    srv.start()
    assert [e["id"] for e in srv.api("GET", "/api/admin/suspend/v1").json()] == [sid]
    # a marker sent after the restart is delivered: held mail, due before it, was not
    srv.send(["after@marker.example"])
    wait_for(lambda: sink.recipients() == ["after@marker.example"])
    srv.kcli("suspend-cancel", "--id", sid, check=True)
    wait_for(lambda: sorted(sink.recipients()) == ["a@example.com", "after@marker.example"])


def test_bad_suspend_requests(make_serve):
    srv = make_serve().start()
    for body, field in [({"domain": "a.com"}, "reason"),
                        ({"reason": "x", "suppress_logging": True}, "suppress_logging"),
                        ({"reason": "x", "duration": "never"}, "duration")]:
        r = srv.api("POST", "/api/admin/suspend/v1", body)
        assert r.status_code == 422 and field in r.json()["error"]
    assert srv.api("GET", "/api/admin/suspend/v1").json() == []
    r = srv.api("DELETE", "/api/admin/suspend/v1", {"id": "6f1c1f7e-3b7a-4c1e-9a53-0d6f5a0f6b11"})
    assert r.status_code == 404
