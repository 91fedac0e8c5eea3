"""The admin bounce guarantees (the operator guide's, and Sluice's own), one
test each, on a real server."""

from __future__ import annotations

import pytest

from ..support import SlowPeer, free_port, wait_for

TERMINAL = ("Delivery", "Bounce", "Expiration", "AdminBounce")


def held_server(make_serve, domains=("example.com", "yahoo.com", "other.org"), **kw):
    """A server whose mail stays queued: routes point at a closed port."""
    dead = free_port()
    return make_serve(routes={d: f"127.0.0.1:{dead}" for d in domains},
                      queue='retry_interval = "1h"', **kw).start()


def terminal_types(srv) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in srv.records():
        if r["type"] in TERMINAL:
            out.setdefault(r["id"], []).append(r["type"])
    return out


# None: the default (reception and delivery in their own processes); 0: one process.
ONE_OR_MORE_PROCESSES = pytest.mark.parametrize("workers", [None, 0], ids=["default", "workers0"])


@ONE_OR_MORE_PROCESSES
def test_fence_message_promoted_for_delivery_is_not_delivered(make_serve, workers):
    """Guarantee 1: a message already waiting for a connection when the rule lands."""
    peer = SlowPeer(greet_delay=3.0).start()
    try:
        srv = make_serve(routes={"example.com": f"127.0.0.1:{peer.port}"}, workers=workers).start()
        srv.send(["held@example.com"], headers={"X-Campaign": "oops"})
        # promoted to the ready queue, its connection still waiting for the greeting
        wait_for(lambda: any(s["queued"] for s in srv.api("GET", "/metrics.json").json()["ready"].values()))
        assert peer.connections == 1
        r = srv.api("POST", "/api/admin/bounce/v1", {"campaign": "oops", "reason": "stop"})
        assert r.status_code == 200
        rec = wait_for(lambda: srv.records("AdminBounce"), timeout=15)[0]
        assert rec["recipient"] == "held@example.com"
        # a marker to the same peer is sent: the held message never was
        srv.send(["marker@example.com"], headers={"X-Campaign": "fine"})
        wait_for(lambda: srv.records("Delivery"), timeout=15)
        assert [b"X-Campaign: fine" in d for d in peer.data_received] == [True]
        assert [r["recipient"] for r in srv.records("Delivery")] == ["marker@example.com"]
    finally:
        peer.stop()


def test_sweep_removes_scheduled_and_retrying_mail_with_records(make_serve):
    """Guarantee 2: everything matching in the spool is removed, each with its record."""
    srv = held_server(make_serve)
    srv.send([f"u{i}@example.com" for i in range(30)], headers={"X-Tenant": "t1"})
    srv.send(["keep@example.com"], headers={"X-Tenant": "t2"})
    wait_for(lambda: len(srv.records("TransientFailure")) == 31)  # all waiting for retry
    r = srv.api("POST", "/api/admin/bounce/v1", {"tenant": "t1", "reason": "bad list"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"id", "bounced", "total_bounced"}
    wait_for(lambda: len(srv.records("AdminBounce")) == 30)
    assert srv.scheduled() == {"t2@example.com": 1}
    rec = srv.records("AdminBounce")[0]
    assert rec["response"]["code"] == 551
    assert rec["response"]["enhanced_code"] == {"class": 5, "subject": 7, "detail": 1}
    assert rec["response"]["content"] == "Administrator bounced with reason: bad list"
    assert rec["queue"] == "t1@example.com"
    listed = srv.api("GET", "/api/admin/bounce/v1").json()
    assert listed[0]["bounced"] == {"t1@example.com": 30}
    assert listed[0]["total_bounced"] == 30


def test_rule_catches_new_mail_until_cancelled(make_serve):
    """Guarantee 3, and bounce-cancel: new matching mail is bounced (sender sees 250)."""
    srv = held_server(make_serve)
    out = srv.kcli("bounce", "--domain", "yahoo.com", "--reason", "yahoo off", "--duration", "10m")
    assert out.returncode == 0, out.stderr
    rule_id = out.stdout.strip()
    assert srv.send(["late@yahoo.com"]) == {}  # the sender still gets 250
    rec = wait_for(lambda: srv.records("AdminBounce"))[0]
    assert rec["recipient"] == "late@yahoo.com"
    assert "late@yahoo.com" in {r["recipient"] for r in srv.records("Reception")}
    assert srv.scheduled() == {}
    # HTTP injection is not built yet; SMTP is the way in.
    out = srv.kcli("bounce-cancel", "--id", rule_id)
    assert out.returncode == 0, out.stderr
    assert srv.kcli("bounce-list", "--json").stdout.strip() == "[]"
    srv.send(["after@yahoo.com"])
    wait_for(lambda: srv.scheduled() == {"yahoo.com": 1})
    assert len(srv.records("AdminBounce")) == 1
    # cancelling again: no such rule
    again = srv.kcli("bounce-cancel", "--id", rule_id)
    assert again.returncode == 1 and "404" in again.stderr


def test_message_back_from_transient_failure_is_bounced(make_serve):
    """Guarantee 3: a delivery that fails temporarily while a rule lands is bounced."""
    peer = SlowPeer(greet_delay=2.0, rcpt_reply=b"451 4.3.0 try later").start()
    try:
        srv = make_serve(routes={"example.com": f"127.0.0.1:{peer.port}"}).start()
        srv.send(["retry@example.com"])
        wait_for(lambda: peer.connections == 1)
        r = srv.api("POST", "/api/admin/bounce/v1", {"domain": "example.com", "reason": "r"})
        assert r.status_code == 200
        wait_for(lambda: srv.records("AdminBounce"), timeout=15)
        types = [r["type"] for r in srv.records() if r["recipient"] == "retry@example.com"]
        assert types == ["Reception", "TransientFailure", "AdminBounce"]
        assert srv.scheduled() == {}
    finally:
        peer.stop()


def test_rule_survives_restart(make_serve):
    """Guarantee 4: stored in the spool, in force before the listeners open."""
    srv = held_server(make_serve)
    r = srv.api("POST", "/api/admin/bounce/v1",
                {"campaign": "Promo", "reason": "kept", "duration": "1h"})
    rule_id = r.json()["id"]
    assert srv.stop() == 0
    srv.start()
    listed = srv.api("GET", "/api/admin/bounce/v1").json()
    assert [e["id"] for e in listed] == [rule_id]
    assert listed[0]["reason"] == "kept"
    remain = listed[0]["duration"]
    assert remain.startswith("59m") or remain == "1h", remain
    srv.send(["x@example.com"], headers={"X-Campaign": "Promo"})
    wait_for(lambda: srv.records("AdminBounce"))
    assert srv.api("GET", "/api/admin/bounce/v1").json()[0]["total_bounced"] == 1


def test_same_criteria_replaces_rule(make_serve):
    """Guarantee 5."""
    srv = held_server(make_serve)
    first = srv.api("POST", "/api/admin/bounce/v1", {"domain": "yahoo.com", "reason": "one"}).json()
    second = srv.api("POST", "/api/admin/bounce/v1", {"domain": "Yahoo.com", "reason": "two"}).json()
    other = srv.api("POST", "/api/admin/bounce/v1",
                    {"domain": "yahoo.com", "campaign": "c", "reason": "three"}).json()
    listed = srv.api("GET", "/api/admin/bounce/v1").json()
    assert sorted(e["id"] for e in listed) == sorted([second["id"], other["id"]])
    assert {e["reason"] for e in listed} == {"two", "three"}
    gone = srv.api("DELETE", "/api/admin/bounce/v1", {"id": first["id"]})
    assert gone.status_code == 404


def test_domain_normalized_campaign_case_sensitive(make_serve):
    """Guarantee 6."""
    srv = held_server(make_serve)
    srv.send(["a@yahoo.com"], headers={"X-Campaign": "Back to school"})
    srv.send(["b@other.org"], headers={"X-Campaign": "Back to school"})
    wait_for(lambda: sum(srv.scheduled().values()) == 2)
    out = srv.kcli("bounce", "--campaign", "back to school", "--reason", "wrong case")
    assert out.returncode == 0
    out = srv.kcli("bounce", "--domain", "Yahoo.COM", "--reason", "normalized")
    assert out.returncode == 0
    wait_for(lambda: srv.records("AdminBounce"))
    # a rule made after them, and its sweep, come after theirs
    srv.send(["marker@example.com"])
    srv.kcli("bounce", "--domain", "example.com", "--reason", "marker", check=True)
    wait_for(lambda: len(srv.records("AdminBounce")) == 2)
    assert [r["recipient"] for r in srv.records("AdminBounce")] == ["a@yahoo.com",
                                                                    "marker@example.com"]
    assert srv.scheduled() == {"Back to school:@other.org": 1}
    listed = {e["reason"]: e for e in srv.api("GET", "/api/admin/bounce/v1").json()}
    assert listed["normalized"]["domain"] == "yahoo.com"
    assert listed["wrong case"]["total_bounced"] == 0


@ONE_OR_MORE_PROCESSES
def test_never_both_delivery_and_admin_bounce(make_serve, sink, workers):
    """Guarantee 7: a bounce racing with live delivery; each message ends exactly once."""
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}, workers=workers).start()
    rcpts = [f"r{i}@example.com" for i in range(200)]
    for i in range(0, 200, 50):
        srv.send(rcpts[i:i + 50])
    srv.api("POST", "/api/admin/bounce/v1", {"domain": "example.com", "reason": "race"})
    srv.send(["post@example.com"])
    wait_for(lambda: len(terminal_types(srv)) == 201, timeout=30)
    types = terminal_types(srv)
    assert all(len(t) == 1 for t in types.values()), [t for t in types.values() if len(t) > 1]
    delivered = {r["recipient"] for r in srv.records("Delivery")}
    bounced = {r["recipient"] for r in srv.records("AdminBounce")}
    assert not delivered & bounced
    assert delivered | bounced == set(rcpts) | {"post@example.com"}
    assert "post@example.com" in bounced
    assert set(sink.recipients()) == delivered


def test_suppress_logging_counts_but_writes_no_records(make_serve):
    srv = held_server(make_serve)
    srv.send(["a@example.com", "b@example.com"])
    wait_for(lambda: sum(srv.scheduled().values()) == 2)
    r = srv.api("POST", "/api/admin/bounce/v1",
                {"domain": "example.com", "reason": "quiet", "suppress_logging": True})
    assert r.status_code == 200
    wait_for(lambda: srv.scheduled() == {})
    listed = srv.api("GET", "/api/admin/bounce/v1").json()
    assert listed[0]["total_bounced"] == 2
    # a logged bounce made after it: its record comes after any of the quiet rule's
    srv.send(["marker@yahoo.com"])
    srv.kcli("bounce", "--domain", "yahoo.com", "--reason", "loud", check=True)
    wait_for(lambda: srv.records("AdminBounce"))
    assert [r["recipient"] for r in srv.records("AdminBounce")] == ["marker@yahoo.com"]


def test_dry_run_changes_nothing(make_serve):
    srv = held_server(make_serve)
    srv.send(["a@example.com", "b@example.com"], headers={"X-Campaign": "c"})
    srv.send(["c@yahoo.com"], headers={"X-Campaign": "c"})
    srv.send(["d@yahoo.com"])
    wait_for(lambda: sum(srv.scheduled().values()) == 4)
    r = srv.api("POST", "/api/admin/bounce/v1", {"campaign": "c", "reason": "x", "dry_run": True})
    assert r.json() == {"dry_run": True, "queues": {"c:@example.com": 2, "c:@yahoo.com": 1},
                        "total": 3}
    out = srv.kcli("bounce", "--everything", "--reason", "x", "--dry-run")
    assert out.returncode == 0
    lines = [line.split() for line in out.stdout.strip().splitlines()]
    assert lines[0] == ["QUEUE", "MESSAGES"]
    assert lines[-1] == ["TOTAL", "4"]
    assert srv.api("GET", "/api/admin/bounce/v1").json() == []
    assert sum(srv.scheduled().values()) == 4
    assert srv.records("AdminBounce") == []


def test_queue_names_criterion(make_serve):
    srv = held_server(make_serve)
    srv.send(["a@example.com"], headers={"X-Campaign": "c", "X-Tenant": "t"})
    srv.send(["b@example.com"], headers={"X-Campaign": "c"})
    wait_for(lambda: sum(srv.scheduled().values()) == 2)
    out = srv.kcli("bounce", "--queue", "c:t@example.com", "--reason", "by name")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: srv.records("AdminBounce"))
    assert [r["recipient"] for r in srv.records("AdminBounce")] == ["a@example.com"]
    assert srv.scheduled() == {"c:@example.com": 1}
    listed = srv.kcli("bounce-list").stdout
    assert "queue=c:t@example.com" in listed and "by name" in listed


def test_bounce_list_table(make_serve):
    srv = held_server(make_serve)
    srv.kcli("bounce", "--campaign", "Spring Sale", "--tenant", "acme", "--reason", "oops",
             "--duration", "2h", check=True)
    out = srv.kcli("bounce-list")
    header, row = out.stdout.strip().splitlines()
    assert header.split() == ["ID", "STATE", "BOUNCE", "IN", "REASON", "REMAIN", "BOUNCED",
                              "CRITERIA"]
    assert "oops" in row and "campaign=Spring Sale tenant=acme" in row
    assert "1h 59m" in row and " active " in row


@pytest.mark.parametrize("args,needle", [
    (["bounce", "--reason", "x"], "no criteria"),
    (["bounce", "--everything", "--domain", "a.com", "--reason", "x"], "--everything"),
    (["bounce", "--queue", "q", "--domain", "a.com", "--reason", "x"], "--queue"),
    (["bounce", "--domain", "a.com"], "--reason"),
    (["bounce-cancel"], "--id"),
])
def test_kcli_usage_errors_exit_2(make_serve, args, needle):
    srv = held_server(make_serve)
    out = srv.kcli(*args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert srv.api("GET", "/api/admin/bounce/v1").json() == []


def test_kcli_server_refusal_exit_1(make_serve):
    srv = held_server(make_serve)
    out = srv.kcli("bounce", "--domain", "a.com", "--reason", "x", "--duration", "soon")
    assert out.returncode == 1
    assert "422" in out.stderr and "duration" in out.stderr
    down = srv.kcli("bounce-list", env={"KUMO_KCLI_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    assert down.returncode == 1 and "cannot reach" in down.stderr


BAD_REQUESTS = [
    ({"domain": "a.com"}, "reason"),
    ({"reason": ""}, "reason"),
    ({"reason": "   "}, "reason"),
    ({"reason": "x", "colour": "red"}, "colour"),
    ({"reason": "x", "duration": "5 fortnights"}, "duration"),
    ({"reason": "x", "duration": "0s"}, "duration"),
    ({"reason": "x", "duration": "5m", "expires": "2099-01-01T00:00:00Z"}, "expires"),
    ({"reason": "x", "expires": "2001-01-01T00:00:00Z"}, "expires"),
    ({"reason": "x", "expires": "tomorrow"}, "expires"),
    ({"reason": "x", "queue_names": ["a.com"], "domain": "a.com"}, "queue_names"),
    ({"reason": "x", "queue_names": []}, "queue_names"),
    ({"reason": "x", "domain": "bad domain!"}, "domain"),
    ({"reason": 5}, "reason"),
    ({"reason": "x", "suppress_logging": "yes"}, "suppress_logging"),
    ({"reason": "x", "campaign": ["a"]}, "campaign"),
]


@pytest.mark.parametrize("body,field", BAD_REQUESTS)
def test_bad_bounce_requests_are_refused_whole(make_serve, body, field):
    srv = held_server(make_serve)
    srv.send(["a@example.com"])
    r = srv.api("POST", "/api/admin/bounce/v1", body)
    assert r.status_code == 422
    data = r.json()
    assert field in data["error"], data
    assert srv.api("GET", "/api/admin/bounce/v1").json() == []
    assert sum(srv.scheduled().values()) == 1


def test_malformed_json_and_bad_delete(make_serve):
    srv = held_server(make_serve)
    r = srv.api("POST", "/api/admin/bounce/v1", content=b"{not json",
                headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
    r = srv.api("DELETE", "/api/admin/bounce/v1", {"id": "not-a-uuid"})
    assert r.status_code == 422 and "id" in r.json()["error"]
    r = srv.api("DELETE", "/api/admin/bounce/v1", {"id": "6f1c1f7e-3b7a-4c1e-9a53-0d6f5a0f6b11"})
    assert r.status_code == 404 and "no active bounce rule" in r.json()["error"]
