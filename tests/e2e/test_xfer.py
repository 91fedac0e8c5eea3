"""xfer: moving queued mail from one ``sluice serve`` node to another over
HTTP, every message exactly once, also when either node is killed."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from pathlib import Path

import httpx
import msgspec
import pytest

from sluice.xfer import RECEIVE_PATH, XferBatch, XferMessage

from ..support import Serve, free_port, wait_for

HELD = 'retry_interval = "1h"\nmax_retry_interval = "2h"'  # failed mail waits an hour


@pytest.fixture
def nodes(make_serve):
    def make(name: str, extra: str = "", queue: str = HELD, to: int | None = None,
             smtp: str = "") -> Serve:
        """A node; ``to``: the port its example.com mail goes to (else a closed one)."""
        return make_serve(name, queue=queue, extra=extra, smtp=smtp,
                          routes={"example.com": f"127.0.0.1:{to or free_port()}",
                                  "example.net": f"127.0.0.1:{free_port()}"}).start()

    return make


def fill(srv: Serve, n: int, queue: str = "example.com") -> list[str]:
    """``n`` queued messages (due in an hour, one attempt made) written into
    a stopped node's spool, a hundred bodies shared among them; their ids."""
    srv.stop()
    srv.start()  # the spool exists
    srv.stop()
    conn = sqlite3.connect(srv.data / "spool" / "spool.db")
    now = time.time()
    bodies = [conn.execute("INSERT INTO bodies(data, refs) VALUES (?, ?)",
                           (f"Subject: {b}\r\n\r\n".encode() + b"x" * 900 + b"\r\n",
                            n // 100 + 1)).lastrowid for b in range(100)]
    conn.execute("INSERT OR IGNORE INTO queues VALUES (?, ?, NULL, NULL, NULL)", (queue, queue))
    ids = [f"{i:032x}" for i in range(n)]
    conn.executemany(
        "INSERT INTO messages(id, queue, sender, recipient, body_id, size, created, due,"
        " attempts, state, protocol) VALUES (?, ?, 's@x.org', ?, ?, 916, ?, ?, 1, 0, 'ESMTP')",
        [(i, queue, f"r{k}@{queue}", bodies[k % 100], now - 600 + k / n, now + 3600)
         for k, i in enumerate(ids)])
    conn.commit()
    conn.close()
    srv.start()
    return ids


def _epoch(rfc3339: str) -> float:
    return dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def held_ids(srv: Serve) -> dict[str, int]:
    """Every message row of a stopped node's spool: id -> state."""
    conn = sqlite3.connect(srv.data / "spool" / "spool.db")
    try:
        return dict(conn.execute("SELECT id, state FROM messages"))
    finally:
        conn.close()


def xfer_rows(srv: Serve) -> list[dict]:
    r = srv.api("GET", "/api/admin/xfer/v1")
    assert r.status_code == 200, r.text
    return r.json()


def assert_once(source: Serve, target: Serve, ids: list[str], moved: int) -> None:
    """Both nodes stopped: each id on exactly one node, ``moved`` of them on
    the target, with one Reception (Xfer) there and one AdminRebind at the
    source each (a crash may repeat a record, identically)."""
    at_source, at_target = held_ids(source), held_ids(target)
    assert not set(at_source) & set(at_target), "a message is on both nodes"
    assert set(at_source) | set(at_target) == set(ids), "a message is lost"
    assert len(at_target) == moved
    assert set(at_source.values()) <= {0}, "the source still holds mail in an xfer"
    for srv, kind, want in ((target, "Reception", set(at_target)),
                            (source, "AdminRebind", set(at_target))):
        by_id: dict[str, set[str]] = {}
        for r in srv.records(kind):
            if kind == "Reception":
                assert r["reception_protocol"] == "Xfer"
            by_id.setdefault(r["id"], set()).add(json.dumps(r, sort_keys=True))
        assert set(by_id) == want
        assert all(len(v) == 1 for v in by_id.values()), f"two different {kind} records"


def test_xfer_moves_matching_mail_keeping_id_created_attempts_and_due(nodes):
    a, b = nodes("node-a"), nodes("node-b")
    a.send([f"u{i}@example.com" for i in range(30)], headers={"X-Campaign": "spring"})
    a.send(["stays@example.net"])
    wait_for(lambda: len(a.records("TransientFailure")) == 31)  # one attempt each, due in 1h
    before = {r["id"]: r for r in a.records("Reception")}
    one = sorted(before)[0]
    was = a.api("GET", "/api/admin/inspect-message/v1", params={"id": one}).json()
    run = a.kcli("xfer", "--campaign", "spring", "--target", b.endpoint, "--reason", "maintenance",
                 check=True)
    xfer_id = run.stdout.strip()
    wait_for(lambda: [x["state"] for x in xfer_rows(a)] == ["done"], timeout=30)
    [row] = xfer_rows(a)
    assert (row["id"], row["moved"], row["waiting"], row["sent"]) == (xfer_id, 30, 0, 0)
    assert row["queue_name"] == b.endpoint + ".xfer.kumomta.internal"
    assert a.scheduled() == {"example.net": 1}
    assert b.scheduled() == {"spring:@example.com": 30}
    rebinds = wait_for(lambda: len(a.records("AdminRebind")) == 30 and a.records("AdminRebind"))
    assert {r["response"]["content"] for r in rebinds} == \
        {f"Transferred to {b.endpoint}: maintenance"}
    received = wait_for(lambda: len(b.records("Reception")) == 30 and b.records("Reception"))
    for r in received:
        original = before[r["id"]]
        assert r["reception_protocol"] == "Xfer"
        assert r["created_time"] == original["created_time"]
        assert r["num_attempts"] == 1 and r["meta"] == {"campaign": "spring"}
        assert r["sender"] == original["sender"] and r["recipient"] == original["recipient"]
    # due time, attempts and body as they were: waiting for the retry an hour on
    shown = b.api("GET", "/api/admin/inspect-message/v1",
                  params={"id": one, "want_body": "true"}).json()
    assert (shown["created"], shown["due"], shown["attempts"]) == \
        (was["created"], was["due"], 1)
    assert _epoch(shown["due"]) > time.time() + 3000
    assert shown["body"].endswith("X-Campaign: spring\r\n\r\nhello\r\n")
    table = a.kcli("xfer-list", check=True).stdout
    assert xfer_id in table and "done" in table and "campaign=spring" in table
    audit = [e for e in a.api("GET", "/api/admin/audit/v1").json() if e["action"] == "xfer"]
    assert audit and audit[0]["rule_id"] == xfer_id and audit[0]["matched"] == \
        {"spring:@example.com": 30}


def test_the_target_delivers_what_it_received_with_the_same_id(nodes, sink):
    a = nodes("node-a", queue='retry_interval = "2s"\nmax_retry_interval = "2s"')
    b = nodes("node-b", to=sink.port)
    a.api("POST", "/api/admin/suspend/v1", {"domain": "example.com", "reason": "hold"})
    a.send(["one@example.com", "two@example.com"])
    wait_for(lambda: a.scheduled() == {"example.com": 2})
    ids = {r["id"] for r in a.records("Reception")}
    a.api("POST", "/api/admin/xfer/v1", {"domain": "example.com", "target": b.endpoint,
                                         "reason": "drain"}).raise_for_status()
    wait_for(lambda: sorted(sink.recipients()) == ["one@example.com", "two@example.com"])
    delivered = wait_for(lambda: len(b.records("Delivery")) == 2 and b.records("Delivery"))
    assert {r["id"] for r in delivered} == ids
    assert a.scheduled() == {}


@pytest.mark.parametrize("victim", ["source", "target"])
def test_kill_9_during_an_xfer_of_20000_messages_moves_each_exactly_once(nodes, victim):
    n = 20000
    a, b = nodes("node-a"), nodes("node-b")
    ids = fill(a, n)
    r = a.api("POST", "/api/admin/xfer/v1", {"target": b.endpoint, "reason": "drain"})
    assert r.status_code == 200, r.text
    wait_for(lambda: sum(b.scheduled().values()) > 0, timeout=30, interval=0.01)
    killed = a if victim == "source" else b
    killed.kill()
    partial = len(held_ids(b)) if victim == "target" else sum(b.scheduled().values())
    assert 0 < partial < n, "killed in the middle"
    killed.start()
    wait_for(lambda: [x["state"] for x in xfer_rows(a)] == ["done"], timeout=120)
    assert [(x["moved"], x["waiting"], x["sent"]) for x in xfer_rows(a)][0][1:] == (0, 0)
    wait_for(lambda: sum(b.scheduled().values()) == n, timeout=30)
    assert a.scheduled() == {}
    a.stop()
    b.stop()
    assert_once(a, b, ids, n)


def test_xfer_cancel_gives_back_what_was_not_sent_and_finishes_what_was(nodes):
    n = 10000
    a, b = nodes("node-a"), nodes("node-b")
    ids = fill(a, n)
    r = a.api("POST", "/api/admin/xfer/v1", {"domain": "example.com", "target": b.endpoint,
                                             "reason": "drain"})
    assert r.status_code == 200, r.text
    queue_name = r.json()["queue_name"]
    wait_for(lambda: sum(b.scheduled().values()) > 0, timeout=30, interval=0.01)
    b.kill()  # what is sent now gets no answer
    run = a.kcli("xfer-cancel", "--reason", "changed my mind", queue_name, check=True)
    assert "back in their queues" in run.stdout
    [row] = xfer_rows(a)
    assert row["state"] == "cancelled" and row["waiting"] == 0
    assert row["returned"] > 0
    assert sum(a.scheduled().values()) == row["returned"]
    back = wait_for(lambda: len(a.records("AdminRebind")) >= row["returned"]
                    and a.records("AdminRebind"))
    assert sum("cancelled: changed my mind" in r["response"]["content"] for r in back) == \
        row["returned"]
    b.start()  # the batches in flight finish moving
    wait_for(lambda: xfer_rows(a)[0]["sent"] == 0, timeout=60)
    moved = xfer_rows(a)[0]["moved"]
    assert moved + row["returned"] == n
    # a cancelled xfer takes nothing more
    assert sum(a.scheduled().values()) == row["returned"]
    r = a.api("POST", "/api/admin/xfer-cancel/v1", {"id": row["id"], "reason": "again"})
    assert r.status_code == 404
    a.stop()
    b.stop()
    at_source, at_target = held_ids(a), held_ids(b)
    assert not set(at_source) & set(at_target)
    assert set(at_source) | set(at_target) == set(ids)
    assert len(at_target) == moved


def test_a_batch_sent_twice_is_stored_once(nodes):
    b = nodes("node-b")
    batch = XferBatch(xfer="x-1", source="some-node", bodies=[b"Subject: t\r\n\r\nhi\r\n"],
                      messages=[XferMessage(f"{i:032x}", "example.com", "s@x.org",
                                            f"r{i}@example.com", 0, time.time() - 60,
                                            time.time() + 3600, 2, "ESMTP") for i in range(5)])
    body = msgspec.msgpack.encode(batch)
    first = httpx.post(b.endpoint + RECEIVE_PATH, content=body).json()
    again = httpx.post(b.endpoint + RECEIVE_PATH, content=body).json()
    assert (first["stored"], first["known"]) == (5, 0)
    assert (again["stored"], again["known"]) == (0, 5)
    assert b.scheduled() == {"example.com": 5}
    assert len(wait_for(lambda: b.records("Reception"))) == 5


def test_mail_that_left_a_node_can_come_back_to_it_with_a_later_xfer(nodes):
    """A target recognizes what the same xfer sent before, not every id it
    ever saw: mail moved A -> B -> A -> B is on B at the end."""
    a, b = nodes("node-a"), nodes("node-b")
    a.send(["u1@example.com", "u2@example.com", "u3@example.com"])
    wait_for(lambda: len(a.records("TransientFailure")) == 3)
    ids = {r["id"] for r in a.records("Reception")}
    for source, target, n in ((a, b, 1), (b, a, 1), (a, b, 2)):
        r = source.api("POST", "/api/admin/xfer/v1", {"target": target.endpoint, "reason": "move"})
        assert r.status_code == 200, r.text
        wait_for(lambda s=source, n=n: [x["state"] for x in xfer_rows(s)] == ["done"] * n)
        assert target.scheduled() == {"example.com": 3} and source.scheduled() == {}
    assert {r["id"] for r in b.records("Reception") if r["reception_protocol"] == "Xfer"} == ids


def test_bad_xfer_requests_get_a_clear_error_and_change_nothing(nodes):
    a, b = nodes("node-a"), nodes("node-b")
    a.send(["u@example.com"])
    wait_for(lambda: a.records("TransientFailure"))
    for body, field in (({"reason": "r"}, "target"),
                        ({"target": "ftp://10.0.0.2", "reason": "r"}, "target"),
                        ({"target": "http://10.0.0.2:8000/api", "reason": "r"}, "target"),
                        ({"target": b.endpoint}, "reason"),
                        ({"target": b.endpoint, "reason": " "}, "reason"),
                        ({"target": b.endpoint, "reason": "r", "domain": "bad domain"}, "domain"),
                        ({"target": b.endpoint, "reason": "r", "older_than": "soon"}, "older_than"),
                        ({"target": b.endpoint, "reason": "r", "duration": "5m"}, "duration")):
        r = a.api("POST", "/api/admin/xfer/v1", body)
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, (body, r.text)
    r = a.api("POST", "/api/admin/xfer/v1", {"target": b.endpoint, "reason": "r",
                                             "domain": "example.net", "older_than": "2h"})
    assert r.status_code == 200
    assert xfer_rows(a)[0]["criteria"]["older_than"] == "2h"
    assert "older_than=2h" in a.kcli("xfer-list", check=True).stdout
    for target, says in (("http://127.0.0.1:1", "cannot reach"), (a.endpoint, "is this node")):
        r = a.api("POST", "/api/admin/xfer/v1", {"target": target, "reason": "r"})
        assert r.status_code == 502 and says in r.json()["error"], r.text
    assert len(xfer_rows(a)) == 1 and a.scheduled() == {"example.com": 1}
    for body, code in (({"id": "nope", "reason": "r"}, 404),
                       ({"reason": "r"}, 422),
                       ({"id": "x", "queue_name": "y.xfer.kumomta.internal", "reason": "r"}, 422),
                       ({"queue_name": "http://h:1", "reason": "r"}, 422)):
        r = a.api("POST", "/api/admin/xfer-cancel/v1", body)
        assert r.status_code == code and "error" in r.json(), (body, r.text)
    assert a.kcli("xfer", "--target", b.endpoint, "--reason", "r").returncode == 2  # no criteria
    # the receiving end: what is not an xfer batch is refused, naming what is wrong
    r = httpx.post(b.endpoint + RECEIVE_PATH, content=b"\x93garbage")
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "body"
    bad = XferBatch(xfer="x", source="s", bodies=[],
                    messages=[XferMessage("ab" * 16, "example.com", "s@x.org", "r@example.com",
                                          3, 0.0, 0.0, 0)])
    r = httpx.post(b.endpoint + RECEIVE_PATH, content=msgspec.msgpack.encode(bad))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "messages.0.body"
    assert b.scheduled() == {}


def test_the_source_presents_the_cluster_token_to_a_target_that_trusts_no_host(nodes, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("node-a:s3cret-xfer\n")
    b = nodes("node-b", extra="")
    b.stop()
    b.config.write_text(b.config.read_text().replace(
        "[http]\n", f'[http]\ntrusted_hosts = []\ntokens_file = "{tokens}"\n'))
    b.start()
    plain = nodes("node-c")
    r = plain.api("POST", "/api/admin/xfer/v1", {"target": b.endpoint, "reason": "r"})
    assert r.status_code == 502 and "401" in r.json()["error"] and "token" in r.json()["error"]
    a = nodes("node-a", extra='[cluster]\ntoken = "s3cret-xfer"\n')
    a.send(["t@example.com"])
    wait_for(lambda: a.records("TransientFailure"))
    r = a.api("POST", "/api/admin/xfer/v1", {"target": b.endpoint, "reason": "r"})
    assert r.status_code == 200, r.text
    wait_for(lambda: b.api("GET", "/metrics.json", headers={
        "Authorization": "Bearer s3cret-xfer"}).json()["scheduled"] == {"example.com": 1})
    assert "s3cret" not in (a.data / "logs" / "audit.jsonl").read_text()
    assert not any("s3cret" in p.read_text() for p in Path(a.data / "logs").glob("*.jsonl"))


def test_the_target_applies_its_own_rules_to_what_it_receives(nodes):
    a, b = nodes("node-a"), nodes("node-b")
    a.send(["x1@example.com", "x2@example.com"])
    a.send(["y@example.net"])
    wait_for(lambda: len(a.records("TransientFailure")) == 3)
    rule = b.api("POST", "/api/admin/bounce/v1", {"domain": "example.com", "reason": "no more",
                                                  "duration": "1h"}).json()["id"]
    b.api("POST", "/api/admin/suspend/v1", {"domain": "example.net", "reason": "later"})
    a.api("POST", "/api/admin/xfer/v1", {"target": b.endpoint, "reason": "drain"}
          ).raise_for_status()
    wait_for(lambda: [x["state"] for x in xfer_rows(a)] == ["done"])
    assert a.scheduled() == {}
    bounced = wait_for(lambda: len(b.records("AdminBounce")) == 2 and b.records("AdminBounce"))
    assert {r["recipient"] for r in bounced} == {"x1@example.com", "x2@example.com"}
    assert b.scheduled() == {"example.net": 1}  # held by the suspension
    # what the bounce rule caught there is retained there: a restore brings it back
    answer = b.api("POST", "/api/admin/bounce/v1/restore", {"id": rule}).json()
    assert answer["total_restored"] == 2
    assert b.scheduled() == {"example.com": 2, "example.net": 1}


def test_batches_too_large_for_the_target_go_in_halves(nodes):
    a = nodes("node-a")
    b = nodes("node-b", smtp="max_message_size = 20000")  # requests up to about 100 KB
    ids = fill(a, 1000)
    r = a.api("POST", "/api/admin/xfer/v1", {"target": b.endpoint, "reason": "drain"})
    assert r.status_code == 200, r.text
    wait_for(lambda: [x["state"] for x in xfer_rows(a)] == ["done"], timeout=60)
    assert xfer_rows(a)[0]["moved"] == 1000
    a.stop()
    b.stop()
    assert_once(a, b, ids, 1000)
