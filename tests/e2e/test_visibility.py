"""queue-summary, /metrics, /metrics.json, liveness and inspect-message agree with what was sent."""

from __future__ import annotations

import datetime as dt
import json
import re

from ..support import free_port, wait_for


def _held(make_serve):
    dead = free_port()
    return make_serve(routes={d: f"127.0.0.1:{dead}" for d in ("example.com", "yahoo.com")},
                      queue='retry_interval = "1h"').start()


def test_queue_summary_and_metrics_agree(make_serve):
    srv = _held(make_serve)
    srv.send([f"a{i}@example.com" for i in range(3)], headers={"X-Campaign": "c1"})
    srv.send(["b@yahoo.com"], headers={"X-Tenant": "t"})
    wait_for(lambda: len(srv.records("TransientFailure")) == 4)

    summary = json.loads(srv.kcli("queue-summary", "--json", check=True).stdout)
    assert summary["scheduled"] == {"c1:@example.com": 3, "t@yahoo.com": 1}
    assert srv.api("GET", "/metrics.json").json()["scheduled"] == summary["scheduled"]
    site = summary["ready"][next(iter(summary["ready"]))]
    assert set(site) == {"delivered", "failed", "connections", "queued", "max_connections",
                         "max_deliveries_per_connection", "max_message_rate",
                         "max_connection_rate", "message_rate_limit", "throttled_until", "rate"}
    assert site["max_connections"] == 32 and site["max_message_rate"] is None
    assert site["failed"] >= 3 and site["delivered"] == 0

    table = srv.kcli("queue-summary", "--by-volume", check=True).stdout.splitlines()
    rows = [line.split() for line in table if line.strip()]
    assert ["QUEUE", "COUNT"] in rows
    q = rows[rows.index(["QUEUE", "COUNT"]) + 1:]
    assert q == [["c1:@example.com", "3"], ["t@yahoo.com", "1"]]
    limited = srv.kcli("queue-summary", "--json", "--domain", "Yahoo.com").stdout
    assert json.loads(limited)["scheduled"] == {"t@yahoo.com": 1}
    one = json.loads(srv.kcli("queue-summary", "--json", "--by-volume", "--limit", "1").stdout)
    assert one["scheduled"] == {"c1:@example.com": 3}

    text = srv.api("GET", "/metrics").text
    assert "sluice_messages_received_total 4.0" in text
    assert 'sluice_scheduled_queue_size{queue="c1:@example.com"} 3.0' in text
    assert "sluice_spool_messages 4.0" in text
    assert "sluice_transient_failures_total 4.0" in text

    srv.kcli("bounce", "--domain", "yahoo.com", "--reason", "x", check=True)
    wait_for(lambda: "sluice_messages_admin_bounced_total 1.0" in srv.api("GET", "/metrics").text)
    assert srv.api("GET", "/api/check-liveness/v1").status_code == 200


def test_inspect_message(make_serve):
    srv = _held(make_serve)
    srv.send(["who@example.com"], headers={"X-Campaign": "c", "X-Tenant": "t"},
             body="the body\r\n")
    wait_for(lambda: srv.records("TransientFailure"))
    msg_id = srv.records("Reception")[0]["id"]
    out = srv.kcli("inspect-message", "--id", msg_id, "--json", check=True)
    data = json.loads(out.stdout)
    assert data["queue"] == "c:t@example.com"
    assert data["meta"] == {"tenant": "t", "campaign": "c"}
    assert data["attempts"] == 1
    assert data["recipient"] == "who@example.com"
    due = dt.datetime.fromisoformat(data["due"].replace("Z", "+00:00"))
    created = dt.datetime.fromisoformat(data["created"].replace("Z", "+00:00"))
    assert 3000 < (due - created).total_seconds() < 4400  # retry_interval 1h, +/-10%
    assert "body" not in data
    with_body = json.loads(srv.kcli("inspect-message", "--id", msg_id, "--want-body",
                                    "--json").stdout)
    assert "the body" in with_body["body"]
    # KumoMTA's form: the id as the argument; without --json, a table
    table = srv.kcli("inspect-message", msg_id, check=True).stdout
    assert re.search(r"QUEUE\s+c:t@example.com", table) and re.search(r"ATTEMPTS\s+1", table)
    assert re.search(r"META\s+tenant=t campaign=c", table)
    assert "the body" in srv.kcli("inspect-message", msg_id, "--want-body", check=True).stdout
    missing = srv.kcli("inspect-message", "0" * 32)
    assert missing.returncode == 1 and "404" in missing.stderr
    for usage in (["inspect-message"], ["inspect-message", msg_id, "--id", "0" * 32]):
        assert srv.kcli(*usage).returncode == 2
