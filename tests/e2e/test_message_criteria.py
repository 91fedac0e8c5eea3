"""Per-message criteria: sender and recipient globs, older_than; with the queue
criteria, for bounce, suspend and dry run, at every checkpoint."""

from __future__ import annotations

import json
import time

from ..support import free_port, wait_for


def test_bounce_everything_from_a_compromised_sender_and_nothing_else(make_serve):
    dead = free_port()
    srv = make_serve(routes={d: f"127.0.0.1:{dead}" for d in ("a.example", "b.example")},
                     queue='retry_interval = "1h"').start()
    for tenant in ("acme", "globex"):
        srv.send(["x1@a.example", "x2@b.example"], sender="Spam@That-Sender.example",
                 headers={"X-Tenant": tenant})
        srv.send(["y1@a.example", "y2@b.example"], sender="legit@other.example",
                 headers={"X-Tenant": tenant})
    wait_for(lambda: sum(srv.scheduled().values()) == 8)

    dry = srv.kcli("bounce", "--sender", "*@that-sender.example", "--reason", "compromised",
                   "--dry-run", check=True).stdout
    assert "TOTAL" in dry and "4" in dry.split("TOTAL")[1]
    body = srv.api("POST", "/api/admin/bounce/v1", {"sender": "*@that-sender.example",
                                                    "reason": "compromised", "dry_run": True})
    answer = body.json()
    assert answer["total"] == 4 and len(answer["queues"]) == 4
    assert {s["sender"] for s in answer["samples"]} == {"Spam@That-Sender.example"}
    assert len(answer["samples"]) == 4

    out = srv.kcli("bounce", "--sender", "*@that-sender.example", "--reason", "compromised",
                   check=True)
    rule_id = out.stdout.strip()
    wait_for(lambda: len(srv.records("AdminBounce")) == 4)
    assert {r["sender"] for r in srv.records("AdminBounce")} == {"Spam@That-Sender.example"}
    assert sum(srv.scheduled().values()) == 4
    # new mail: the bad sender's is caught on arrival, the rest is queued
    srv.send(["late@a.example"], sender="again@THAT-SENDER.example")
    srv.send(["fine@a.example"], sender="legit@other.example")
    wait_for(lambda: len(srv.records("AdminBounce")) == 5)
    assert srv.by_recipient("AdminBounce")["late@a.example"]["reception_protocol"] == "ESMTP"
    wait_for(lambda: sum(srv.scheduled().values()) == 5)
    listed = json.loads(srv.kcli("bounce-list", "--json", check=True).stdout)
    assert listed[0]["id"] == rule_id and listed[0]["sender"] == "*@that-sender.example"
    assert listed[0]["total_bounced"] == 5
    assert "sender=*@that-sender.example" in srv.kcli("bounce-list", check=True).stdout


def test_suspend_by_recipient_holds_only_those(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    sid = srv.kcli("suspend", "--recipient", "vip-*@example.com", "--reason", "check first",
                   check=True).stdout.strip()
    srv.send(["vip-1@example.com", "other@example.com", "VIP-2@Example.com"])
    wait_for(lambda: sink.recipients() == ["other@example.com"])
    srv.send(["after@example.com"])  # a marker: delivered after the held ones were considered
    wait_for(lambda: sorted(sink.recipients()) == ["after@example.com", "other@example.com"])
    srv.kcli("suspend-cancel", "--id", sid, check=True)
    wait_for(lambda: len(sink.recipients()) == 4)
    assert {r.lower() for r in sink.recipients()} >= {"vip-1@example.com", "vip-2@example.com"}


def test_older_than_takes_the_old_and_leaves_the_new(make_serve):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{free_port()}"},
                     queue='retry_interval = "1h"').start()
    srv.send(["old@example.com"])
    old_created = wait_for(lambda: srv.by_recipient("Reception").get("old@example.com"))[
        "created_time"]
    wait_for(lambda: time.time() - _epoch(old_created) > 3.0, timeout=10)  # it is older now
    srv.send(["new@example.com"])
    out = srv.kcli("bounce", "--domain", "example.com", "--older-than", "2s",
                   "--reason", "stale", check=True)
    assert out.returncode == 0
    wait_for(lambda: srv.records("AdminBounce"))
    # a later rule's record comes after any of this sweep's: only the old one went
    srv.kcli("bounce", "--recipient", "marker@*", "--reason", "marker", check=True)
    srv.send(["marker@example.com"])
    wait_for(lambda: len(srv.records("AdminBounce")) == 2)
    assert [r["recipient"] for r in srv.records("AdminBounce")] == [
        "old@example.com", "marker@example.com"]
    assert srv.scheduled() == {"example.com": 1}


def _epoch(rfc3339: str) -> float:
    import datetime as dt
    return dt.datetime.fromisoformat(rfc3339).timestamp()


def test_bad_per_message_criteria_are_refused_naming_the_field(make_serve):
    srv = make_serve().start()
    for body, field in [({"sender": "", "reason": "x"}, "sender"),
                        ({"recipient": "   ", "reason": "x"}, "recipient"),
                        ({"sender": "a b@x", "reason": "x"}, "sender"),
                        ({"older_than": "never", "reason": "x"}, "older_than"),
                        ({"older_than": "0s", "reason": "x"}, "older_than"),
                        ({"sender": 5, "reason": "x"}, "sender")]:
        for path in ("/api/admin/bounce/v1", "/api/admin/suspend/v1"):
            r = srv.api("POST", path, body)
            assert r.status_code == 422, (path, body, r.text)
            assert r.json()["detail"][0]["field"] == field
    assert srv.api("GET", "/api/admin/bounce/v1").json() == []
    assert srv.api("GET", "/api/admin/suspend/v1").json() == []
    usage = srv.kcli("bounce", "--reason", "x")
    assert usage.returncode == 2 and "--sender" in usage.stderr
