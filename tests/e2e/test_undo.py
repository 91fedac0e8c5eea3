"""Undoing a mistake: grace, restore, and the audit of who did what."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import time
import uuid

import httpx
import pytest

from ..support import free_port, wait_for


def dead_route(make_serve, extra: str = "", **kw):
    """A server whose mail stays queued (one failed attempt, then due in an hour)."""
    return make_serve(routes={d: f"127.0.0.1:{free_port()}" for d in ("a.example", "b.example")},
                      queue='retry_interval = "1h"\nmax_retry_interval = "2h"',
                      extra=extra, **kw).start()


def epoch(rfc3339: str) -> float:
    return dt.datetime.fromisoformat(rfc3339).timestamp()


# ---- grace ------------------------------------------------------------------

def test_pending_rule_holds_and_cancel_releases_as_if_nothing_happened(make_serve, sink):
    srv = make_serve(routes={d: f"127.0.0.1:{sink.port}" for d in ("a.example", "b.example")}
                     ).start()
    out = srv.kcli("bounce", "--domain", "a.example", "--reason", "oops", "--grace", "1h",
                   check=True)
    rule = out.stdout.strip()
    assert "held for 1h" in out.stderr
    srv.send(["x@a.example", "y@a.example"])
    srv.send(["marker@b.example"])  # sent after: delivered, so the held ones were considered
    wait_for(lambda: sink.recipients() == ["marker@b.example"])
    [entry] = srv.api("GET", "/api/admin/bounce/v1").json()
    assert entry["state"] == "pending" and entry["bounce_in"].startswith("59m")
    assert entry["held"] == {"a.example": 2} and entry["total_bounced"] == 0
    table = srv.kcli("bounce-list", check=True).stdout
    assert "pending" in table and "59m" in table
    srv.kcli("bounce-cancel", "--id", rule, check=True)
    wait_for(lambda: len(sink.recipients()) == 3)
    assert srv.records("AdminBounce") == []
    assert {r["num_attempts"] for r in srv.records("Delivery")} == {1}


def test_apply_ends_the_grace_and_bounces_what_was_held(make_serve):
    srv = dead_route(make_serve)
    rule = srv.kcli("bounce", "--tenant", "acme", "--reason", "wrong tenant", "--grace", "1h",
                    check=True).stdout.strip()
    srv.send(["x@a.example", "y@b.example"], headers={"X-Tenant": "acme"})
    srv.send(["z@a.example"])
    wait_for(lambda: sum(srv.scheduled().values()) == 3)
    assert srv.records("AdminBounce") == []
    assert srv.kcli("bounce-apply", "--id", rule, check=True).returncode == 0
    wait_for(lambda: len(srv.records("AdminBounce")) == 2)
    assert {r["recipient"] for r in srv.records("AdminBounce")} == {"x@a.example", "y@b.example"}
    [entry] = srv.api("GET", "/api/admin/bounce/v1").json()
    assert (entry["state"], entry["bounce_in"], entry["total_bounced"]) == ("active", None, 2)
    # from now on it bounces new mail on arrival
    srv.send(["late@a.example"], headers={"X-Tenant": "acme"})
    wait_for(lambda: len(srv.records("AdminBounce")) == 3)


def test_grace_survives_kill_9_and_ends_on_time(make_serve):
    srv = dead_route(make_serve)
    srv.send(["x@a.example"])
    wait_for(lambda: srv.scheduled() == {"a.example": 1})
    r = srv.api("POST", "/api/admin/bounce/v1",
                {"domain": "a.example", "reason": "later", "grace": "4s"})
    ends = time.time() + 4
    rule = r.json()["id"]
    srv.kill()
    srv.start()
    [entry] = srv.api("GET", "/api/admin/bounce/v1").json()
    assert (entry["id"], entry["state"]) == (rule, "pending")
    assert entry["held"] == {"a.example": 1}
    rec = wait_for(lambda: srv.records("AdminBounce"), timeout=20)[0]
    assert epoch(rec["event_time"]) >= ends - 0.5  # not before the grace ended
    assert srv.scheduled() == {}


# ---- restore ----------------------------------------------------------------

def test_restore_puts_every_message_back_as_it_was(make_serve):
    srv = dead_route(make_serve)
    srv.send([f"r{i}@a.example" for i in range(5)], headers={"X-Campaign": "Back to school"})
    srv.send(["keep@b.example"])
    wait_for(lambda: len(srv.records("TransientFailure")) == 6)
    before = {}
    for rec in srv.records("Reception"):
        before[rec["id"]] = srv.api("GET", f"/api/admin/inspect-message/v1?id={rec['id']}").json()
    rule = srv.kcli("bounce", "--campaign", "Back to school", "--reason", "wrong list",
                    check=True).stdout.strip()
    wait_for(lambda: len(srv.records("AdminBounce")) == 5)
    assert srv.scheduled() == {"b.example": 1}

    answer = json.loads(srv.kcli("bounce-restore", "--id", rule, "--json", check=True).stdout)
    assert answer == {"restored": {"Back to school:@a.example": 5}, "total_restored": 5,
                      "unavailable": 0}
    assert srv.scheduled() == {"Back to school:@a.example": 5, "b.example": 1}
    wait_for(lambda: len(srv.records("AdminRestore")) == 5)
    restores = srv.records("AdminRestore")
    assert {r["response"]["content"] for r in restores} == {"Administrator restored: wrong list"}
    for rec in restores:
        now = srv.api("GET", f"/api/admin/inspect-message/v1?id={rec['id']}").json()
        assert now == before[rec["id"]]  # queue, created, attempts and due as they were
    # the rule ended with the restore; a second restore finds nothing more
    assert srv.api("GET", "/api/admin/bounce/v1").json() == []
    again = srv.api("POST", "/api/admin/bounce/v1/restore", {"id": rule}).json()
    assert again == {"restored": {}, "total_restored": 0, "unavailable": 0}
    # every restored message: AdminBounce, then AdminRestore, and no other terminal record
    kinds: dict[str, list[str]] = {}
    for r in srv.records():
        kinds.setdefault(r["id"], []).append(r["type"])
    for rec in restores:
        assert kinds[rec["id"]] == ["Reception", "TransientFailure", "AdminBounce", "AdminRestore"]


def test_restore_brings_back_mail_caught_on_arrival_after_the_rule_ended(make_serve, sink):
    srv = make_serve(routes={"a.example": f"127.0.0.1:{sink.port}"}).start()
    r = srv.api("POST", "/api/admin/bounce/v1", {"domain": "a.example", "reason": "oops",
                                                 "duration": "2s"})
    rule = r.json()["id"]
    srv.send(["caught@a.example"])
    wait_for(lambda: srv.records("AdminBounce"))
    wait_for(lambda: srv.api("GET", "/api/admin/bounce/v1").json() == [], timeout=15)  # expired
    answer = srv.api("POST", "/api/admin/bounce/v1/restore", {"id": rule}).json()
    assert answer["total_restored"] == 1
    wait_for(lambda: sink.recipients() == ["caught@a.example"])
    # the log writer may lag the sink
    [delivered] = wait_for(lambda: srv.records("Delivery"))
    assert delivered["id"] == srv.records("AdminRestore")[0]["id"]


def test_without_retention_nothing_can_be_restored(make_serve):
    srv = dead_route(make_serve, extra='[admin]\nbounce_retention = "0s"')
    srv.send(["a@a.example", "b@a.example"])
    wait_for(lambda: len(srv.records("TransientFailure")) == 2)
    rule = srv.api("POST", "/api/admin/bounce/v1", {"domain": "a.example", "reason": "r"}
                   ).json()["id"]
    wait_for(lambda: len(srv.records("AdminBounce")) == 2)
    answer = srv.api("POST", "/api/admin/bounce/v1/restore", {"id": rule}).json()
    assert answer == {"restored": {}, "total_restored": 0, "unavailable": 2}


def test_restore_of_an_unknown_rule_is_404_and_bad_ids_are_422(make_serve):
    srv = dead_route(make_serve)
    r = srv.api("POST", "/api/admin/bounce/v1/restore", {"id": str(uuid.uuid4())})
    assert r.status_code == 404 and "retention" in r.json()["error"]
    for path in ("/api/admin/bounce/v1/restore", "/api/admin/bounce/v1/apply"):
        for body, field in (({"id": "nope"}, "id"), ({}, "id"), ({"id": str(uuid.uuid4()),
                                                                 "x": 1}, "x")):
            r = srv.api("POST", path, body)
            assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, r.text
    r = srv.api("POST", "/api/admin/bounce/v1/apply", {"id": str(uuid.uuid4())})
    assert r.status_code == 404
    assert srv.kcli("bounce-restore", "--id", str(uuid.uuid4())).returncode == 1


def _fill_retained(db, rule_id: str, n: int) -> None:
    """``n`` messages that bounce rule ``rule_id`` bounced and retention keeps,
    written into a stopped server's spool."""
    conn = sqlite3.connect(db)
    now = time.time()
    key = conn.execute(
        "INSERT INTO rules(id, kind, criteria, reason, created, expires, suppress_logging,"
        " grace_until, ended) VALUES (?, 'bounce', ?, 'bulk', ?, ?, 0, 0, ?)",
        (rule_id, json.dumps({"domain": "a.example"}), now - 60, now - 1, now)).lastrowid
    conn.execute("INSERT INTO rule_counts VALUES (?, 'a.example', ?)", (rule_id, n))
    body = conn.execute("INSERT INTO bodies(data, refs) VALUES (?, ?)",
                        (b"Subject: x\r\n\r\nx\r\n", n)).lastrowid
    conn.execute("INSERT OR IGNORE INTO queues VALUES ('a.example', 'a.example', NULL, NULL,"
                 " NULL)")
    conn.executemany(
        "INSERT INTO messages(id, queue, sender, recipient, body_id, size, created, due,"
        " attempts, state, protocol, rule_key, bounced_at)"
        " VALUES (?, 'a.example', 's@x.org', ?, ?, 16, ?, ?, 1, 3, 'ESMTP', ?, ?)",
        [(f"{i:032x}", f"r{i}@a.example", body, now - 120, now + 3600, key, now - 30)
         for i in range(n)])
    conn.commit()
    conn.close()


def test_kill_9_in_the_middle_of_a_restore_restores_each_message_exactly_once(make_serve):
    n = 20000
    srv = dead_route(make_serve)
    srv.stop()
    rule = str(uuid.uuid4())
    _fill_retained(srv.data / "spool" / "spool.db", rule, n)
    srv.start()

    def restore() -> None:
        try:
            httpx.post(srv.endpoint + "/api/admin/bounce/v1/restore", json={"id": rule},
                       timeout=60)
        except httpx.HTTPError:
            pass  # the server was killed under it

    caller = threading.Thread(target=restore)
    caller.start()
    wait_for(lambda: 0 < sum(srv.scheduled().values()), timeout=30, interval=0.02)
    srv.kill()
    caller.join(30)
    srv.start()
    partial = sum(srv.scheduled().values())
    assert 0 < partial < n  # killed in the middle
    answer = srv.api("POST", "/api/admin/bounce/v1/restore", {"id": rule}).json()
    assert answer["total_restored"] == n - partial and answer["unavailable"] == 0
    assert srv.scheduled() == {"a.example": n}
    wait_for(lambda: len({r["id"] for r in srv.records("AdminRestore")}) == n, timeout=30)
    by_id: dict[str, list[dict]] = {}
    for r in srv.records("AdminRestore"):
        by_id.setdefault(r["id"], []).append(r)
    # a crash may repeat a record, identically; never two different ones
    assert all(len({json.dumps(x, sort_keys=True) for x in recs}) == 1
               for recs in by_id.values())


def test_restore_racing_new_mail_for_the_same_queues(make_serve):
    n = 6000
    srv = dead_route(make_serve)
    srv.stop()
    rule = str(uuid.uuid4())
    _fill_retained(srv.data / "spool" / "spool.db", rule, n)
    srv.start()
    done = []
    caller = threading.Thread(target=lambda: done.append(srv.api(
        "POST", "/api/admin/bounce/v1/restore", {"id": rule}).json()))
    caller.start()
    for i in range(30):
        srv.send([f"new{i}@a.example"])
    caller.join(60)
    assert done[0]["total_restored"] == n
    wait_for(lambda: srv.scheduled() == {"a.example": n + 30})


async def test_retention_over_its_byte_cap_drops_the_oldest_first(tmp_path):
    from ..support import InProcess, settings_for

    settings = settings_for(tmp_path, routes={"a.example": f"127.0.0.1:{free_port()}"})
    async with InProcess(settings) as srv:
        bounces, spool = srv.services.bounces, srv.services.spool
        rules = []
        for i in range(5):  # one message per rule, bounced one after the other
            await srv.send([f"m{i}@a.example"], body="x" * 5)
            rule = await bounces.create(_criteria(f"m{i}@a.example"), f"r{i}",
                                        time.time() + 60)
            rules.append(rule)
            await _until_retained(spool, rule.id)
        size = spool.retained_bytes // 5  # the messages are the same size
        bounces.admin.bounce_retention_max_bytes = 3 * size  # room for three
        await bounces.drop_expired_retention()
        assert spool.retained_bytes == 3 * size
        results = [await bounces.restore(r.id) for r in rules]
        assert [(x.total, x.unavailable) for x in results] == [(0, 1), (0, 1), (1, 0), (1, 0),
                                                               (1, 0)]  # the oldest went first


def _criteria(recipient: str):
    from sluice.rules.criteria import Criteria
    return Criteria.build(recipient=recipient)


async def _until_retained(spool, rule_id: str) -> None:
    import asyncio

    for _ in range(500):
        if await spool.retained_count(rule_id):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not retained")


# ---- audit ------------------------------------------------------------------

def test_every_admin_write_is_audited_with_who_and_what(make_serve, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# who may call\nops-alice:s3cret-alice-token\nbare-token-xyz\n")
    srv = make_serve(routes={"a.example": f"127.0.0.1:{free_port()}"},
                     queue='retry_interval = "1h"\nmax_retry_interval = "2h"')
    srv.config.write_text(srv.config.read_text().replace(
        "[http]\n", f'[http]\ntokens_file = "{tokens}"\n'))
    srv.start()
    srv.send(["x@a.example", "y@a.example"])
    wait_for(lambda: srv.scheduled() == {"a.example": 2})
    alice = {"Authorization": "Bearer s3cret-alice-token"}
    body = {"domain": "a.example", "reason": "audit me", "grace": "1h"}
    rule = srv.api("POST", "/api/admin/bounce/v1", body, headers=alice).json()["id"]
    srv.api("POST", "/api/admin/bounce/v1/apply", {"id": rule},
            headers={"Authorization": "Bearer bare-token-xyz"})
    wait_for(lambda: len(srv.records("AdminBounce")) == 2)
    srv.api("POST", "/api/admin/bounce/v1/restore", {"id": rule})
    sid = srv.api("POST", "/api/admin/suspend/v1", {"tenant": "t", "reason": "hold"}).json()["id"]
    srv.api("DELETE", "/api/admin/suspend/v1", {"id": sid})

    entries = json.loads(srv.kcli("audit", "--json", check=True).stdout)
    assert [e["action"] for e in entries] == [
        "suspend-cancel", "suspend-create", "bounce-restore", "bounce-cancel-for-restore",
        "bounce-apply", "bounce-create"]
    create = entries[-1]
    import hashlib
    bare = "token:" + hashlib.sha256(b"bare-token-xyz").hexdigest()[:8]
    assert (create["actor"], create["remote_addr"], create["rule_id"]) == (
        "token:ops-alice", "127.0.0.1", rule)
    assert create["request"] == body and create["matched"] == {"a.example": 2}
    assert entries[-2]["actor"] == bare
    assert entries[3]["actor"] == "host:127.0.0.1"
    assert entries[2]["result"] == {"restored": {"a.example": 2}, "total_restored": 2,
                                    "unavailable": 0}
    # the same entries, oldest first, in logs/audit.jsonl
    lines = [json.loads(x) for x in (srv.data / "logs" / "audit.jsonl").read_text().splitlines()]
    assert lines == list(reversed(entries))
    # --limit and --since
    assert len(json.loads(srv.kcli("audit", "--json", "--limit", "2").stdout)) == 2
    later = json.loads(srv.kcli("audit", "--json", "--since", entries[1]["time"]).stdout)
    assert [e["action"] for e in later] == ["suspend-cancel", "suspend-create"]
    table = srv.kcli("audit", check=True).stdout
    assert "bounce-restore" in table and "token:ops-alice" in table
    bad = srv.api("GET", "/api/admin/audit/v1?since=yesterday")
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "since"


def test_bad_grace_is_refused_naming_the_field_and_nothing_is_done(make_serve):
    srv = dead_route(make_serve)
    for body, field in [({"reason": "x", "grace": "soon"}, "grace"),
                        ({"reason": "x", "grace": 5}, "grace")]:
        r = srv.api("POST", "/api/admin/bounce/v1", body)
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field
    r = srv.api("POST", "/api/admin/suspend/v1", {"reason": "x", "grace": "1m"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "grace"
    assert srv.api("GET", "/api/admin/bounce/v1").json() == []
    assert srv.api("GET", "/api/admin/audit/v1").json() == []
    assert srv.kcli("bounce", "--domain", "a.example", "--reason", "x", "--grace", "soon"
                    ).returncode == 1


def test_restore_after_the_rule_was_cancelled(make_serve):
    srv = dead_route(make_serve)
    srv.send(["a@b.example", "b@b.example"])
    wait_for(lambda: len(srv.records("TransientFailure")) == 2)
    rule = srv.kcli("bounce", "--domain", "b.example", "--reason", "oops", check=True).stdout.strip()
    wait_for(lambda: len(srv.records("AdminBounce")) == 2)
    srv.kcli("bounce-cancel", "--id", rule, check=True)
    out = srv.kcli("bounce-restore", "--id", rule, check=True).stdout
    assert "TOTAL" in out and "2" in out.split("TOTAL")[1]
    assert srv.scheduled() == {"b.example": 2}
