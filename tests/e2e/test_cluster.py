"""Nodes in a cluster through a real ``redis-server``: membership and the
cluster views (``kcli cluster-status``, ``queue-summary --cluster``,
``/metrics.json?cluster=true``)."""

from __future__ import annotations

import json
import subprocess

import pytest

from ..support import BIN, Serve, free_port, wait_for
from ..support.peers import Redis

HELD = 'retry_interval = "1h"'  # mail to a closed port waits in its queue


@pytest.fixture
def redis(tmp_path):
    r = Redis(tmp_path / "redis").start()
    yield r
    r.stop()


@pytest.fixture
def nodes(redis, make_serve):  # Redis stops after the nodes
    def make(name: str, extra: str = "", routes: dict[str, str] | None = None) -> Serve:
        return make_serve(name, queue=HELD,
                          routes={"example.com": f"127.0.0.1:{free_port()}", **(routes or {})},
                          extra=f'[cluster]\nredis_url = "{redis.url}"\n{extra}').start()

    return make


def status(srv: Serve) -> list[dict]:
    r = srv.api("GET", "/api/admin/cluster/v1/status")
    assert r.status_code == 200, r.text
    return r.json()["nodes"]


def test_nodes_join_and_the_views_add_up_every_node(nodes):
    a, b, c = nodes("node-a"), nodes("node-b"), nodes("node-c")
    a.send(["x1@example.com", "x2@example.com"], headers={"X-Campaign": "spring"})
    b.send(["y1@example.com", "y2@example.com", "y3@example.com"], headers={"X-Campaign": "spring"})
    c.send(["z@example.com"])
    # the figures are published with every heartbeat (every 2 s)
    summary = wait_for(lambda: (s := json.loads(c.kcli("queue-summary", "--cluster", "--json",
                                                          check=True).stdout))
                       ["scheduled"] == {"spring:@example.com": 5, "example.com": 1} and s)
    assert summary["scheduled"] == {"spring:@example.com": 5, "example.com": 1}
    per_node = a.api("GET", "/metrics.json?cluster=true").json()["nodes"]
    assert {n: sum(f["scheduled"].values()) for n, f in per_node.items()} == \
        {"node-a": 2, "node-b": 3, "node-c": 1}
    # this node's own figures are unchanged without ?cluster=true
    assert a.api("GET", "/metrics.json").json()["scheduled"] == {"spring:@example.com": 2}
    listed = status(b)
    assert [n["name"] for n in listed] == ["node-a", "node-b", "node-c"]
    assert [n["http"] for n in listed] == [a.endpoint, b.endpoint, c.endpoint]
    assert all(n["seconds_since"] < 10 for n in listed)
    table = a.kcli("cluster-status", check=True).stdout
    for name in ("node-a", "node-b", "node-c"):
        assert name in table


def test_a_killed_node_leaves_the_cluster_when_its_heartbeat_expires(nodes):
    a, b, c = nodes("node-a"), nodes("node-b"), nodes("node-c")
    c.kill()
    wait_for(lambda: [n["name"] for n in status(a)] == ["node-a", "node-b"], timeout=30)
    # a node that stops cleanly leaves at once
    b.stop()
    assert [n["name"] for n in status(a)] == ["node-a"]


def test_a_node_name_in_use_stops_the_start(nodes, tmp_path, redis):
    nodes("node-a")
    d = tmp_path / "twin"
    d.mkdir()
    twin = Serve(d, node_name="node-a", extra=f'[cluster]\nredis_url = "{redis.url}"\n')
    r = subprocess.run([BIN / "sluice", "serve", "--config", str(twin.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "server.node_name 'node-a' is in use by another live node" in r.stderr


def test_without_redis_nodes_serve_mail_and_views_say_503_until_it_returns(nodes, redis):
    a, b = nodes("node-a"), nodes("node-b")
    redis.stop()
    r = a.api("GET", "/api/admin/cluster/v1/status")
    assert r.status_code == 503 and "cannot be reached" in r.json()["error"]
    assert a.api("GET", "/metrics.json?cluster=true").status_code == 503
    a.send(["x@example.com"])  # mail is still accepted: each node has its own spool
    assert a.api("GET", "/metrics.json").json()["scheduled"] == {"example.com": 1}
    redis.start()  # an empty Redis on the same port: the heartbeats join again
    wait_for(lambda: a.api("GET", "/api/admin/cluster/v1/status").status_code == 200
             and [n["name"] for n in status(a)] == ["node-a", "node-b"], timeout=30)


def test_cluster_views_on_a_node_without_a_cluster_say_so(make_serve):
    srv = make_serve().start()
    r = srv.api("GET", "/api/admin/cluster/v1/status")
    assert r.status_code == 400 and "not in a cluster" in r.json()["error"]
    r = srv.kcli("cluster-status")
    assert r.returncode != 0 and "not in a cluster" in r.stderr


@pytest.mark.parametrize("url", ["localhost:6379", "http://x", "redis://"])
def test_a_bad_redis_url_stops_the_start_naming_the_key(make_serve, url):
    srv = make_serve(extra=f'[cluster]\nredis_url = "{url}"\n')
    r = subprocess.run([BIN / "sluice", "serve", "--config", str(srv.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cluster.redis_url" in r.stderr


def test_a_node_starts_without_redis_and_joins_when_it_comes(tmp_path):
    redis = Redis(tmp_path / "redis")  # its port: nothing listens there yet
    srv = Serve(tmp_path, node_name="early", extra=f'[cluster]\nredis_url = "{redis.url}"\n')
    try:
        srv.start()
        srv.send(["x@example.com"])
        assert srv.api("GET", "/api/admin/cluster/v1/status").status_code == 503
        redis.start()
        wait_for(lambda: srv.api("GET", "/api/admin/cluster/v1/status").status_code == 200
                 and [n["name"] for n in status(srv)] == ["early"], timeout=30)
        assert "serving alone until it can" in srv.log.read_text()
    finally:
        srv.stop()
        redis.stop()


def _sink_rate(sink, total: int) -> dict:
    """The sink's figures once it has ``total`` messages: the rate over its
    whole seconds (the first and the last, partial, left out)."""
    figures = wait_for(lambda: sink.stats.exists()
                       and (f := json.loads(sink.stats.read_text()))["accepted"] == total and f,
                       timeout=60)
    seconds = sorted(figures["per_second"].items())[1:-1]
    return {"rate": sum(n for _, n in seconds) / len(seconds),
            "busiest": max(n for _, n in seconds)}


@pytest.mark.parametrize("shared", [True, False])
def test_a_shared_rate_holds_for_the_cluster_not_per_node(tmp_path, redis, shared):
    from ..support import Sink

    sink = Sink(tmp_path, stats=tmp_path / "stats.json").start()
    servers = []
    try:
        for name in ("node-a", "node-b"):
            d = tmp_path / name
            d.mkdir()
            servers.append(Serve(d, node_name=name, routes={"example.com": f"127.0.0.1:{sink.port}"},
                                 extra=f'[cluster]\nredis_url = "{redis.url}"\n'
                                       f'[shaping."example.com"]\nmax_message_rate = "20/s"\n'
                                       f'shared = {str(shared).lower()}\n').start())
        for srv in servers:  # 80 messages each, queued at once on both nodes
            srv.send([f"r{i}@example.com" for i in range(80)])
        figures = _sink_rate(sink, 160)
    finally:
        for srv in servers:
            srv.stop()
        sink.stop()
    if shared:  # 20/s for the two nodes together
        assert 18 <= figures["rate"] <= 21 and figures["busiest"] <= 21, figures
    else:  # 20/s each
        assert figures["rate"] >= 30, figures


def test_a_shared_rate_needs_a_cluster(make_serve):
    srv = make_serve(extra='[shaping."example.com"]\nmax_message_rate = "5/s"\nshared = true\n')
    r = subprocess.run([BIN / "sluice", "serve", "--config", str(srv.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and 'shaping."example.com".shared needs [cluster] redis_url' in r.stderr


def _bounce(srv: Serve, **criteria) -> dict:
    r = srv.api("POST", "/api/admin/bounce/v1", {**criteria, "reason": "cluster test",
                                                 "duration": "1h"})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_bounce_on_one_node_holds_on_every_node_before_it_answers(nodes):
    a, b, c = nodes("node-a"), nodes("node-b"), nodes("node-c")
    b.send(["queued-on-b@example.com"])
    c.send(["queued-on-c@example.com"])
    answer = _bounce(a, domain="example.com")
    assert answer["nodes"] == {"node-a": "confirmed", "node-b": "confirmed",
                               "node-c": "confirmed"}
    for srv in (a, b, c):  # the same rule, by id, everywhere
        assert [r["id"] for r in srv.api("GET", "/api/admin/bounce/v1").json()] == [answer["id"]]
    # each node bounces its own queued mail, and new mail at reception
    wait_for(lambda: "queued-on-b@example.com" in b.by_recipient("AdminBounce"))
    wait_for(lambda: "queued-on-c@example.com" in c.by_recipient("AdminBounce"))
    c.send(["new-on-c@example.com"])
    wait_for(lambda: "new-on-c@example.com" in c.by_recipient("AdminBounce"))
    # the other nodes audit it as the cluster's
    actors = {e["actor"] for e in c.api("GET", "/api/admin/audit/v1").json()}
    assert actors == {"cluster:node-a"}
    # a cancel on another node ends it everywhere
    r = b.api("DELETE", "/api/admin/bounce/v1", {"id": answer["id"]})
    assert r.status_code == 200 and set(r.json()["nodes"].values()) == {"confirmed"}
    for srv in (a, b, c):
        assert srv.api("GET", "/api/admin/bounce/v1").json() == []


def test_a_suspension_holds_on_every_node(nodes):
    a, b = nodes("node-a"), nodes("node-b")
    r = b.api("POST", "/api/admin/suspend/v1", {"domain": "example.com", "reason": "x",
                                                "duration": "1h"})
    assert r.status_code == 200 and r.json()["nodes"] == {"node-a": "confirmed",
                                                          "node-b": "confirmed"}
    assert [s["id"] for s in a.api("GET", "/api/admin/suspend/v1").json()] == [r.json()["id"]]


def test_a_node_that_was_down_comes_back_with_the_rules(nodes):
    a, b = nodes("node-a"), nodes("node-b")
    b.kill()  # its heartbeat lives on for a few seconds: it cannot confirm
    answer = _bounce(a, campaign="spring")
    assert answer["nodes"] == {"node-a": "confirmed", "node-b": "unreachable"}
    b.start()  # the rules from the cluster before its listeners open
    assert [r["id"] for r in b.api("GET", "/api/admin/bounce/v1").json()] == [answer["id"]]
    b.send(["x@example.com"], headers={"X-Campaign": "spring"})
    wait_for(lambda: "x@example.com" in b.by_recipient("AdminBounce"))


def test_without_redis_rule_writes_answer_503_and_change_nothing(nodes, redis):
    a, b = nodes("node-a"), nodes("node-b")
    held = _bounce(a, tenant="kept")
    redis.stop()
    r = a.api("POST", "/api/admin/bounce/v1", {"domain": "example.com", "reason": "x",
                                                "duration": "1h"})
    assert r.status_code == 503 and "nothing was changed" in r.json()["error"]
    assert [x["id"] for x in a.api("GET", "/api/admin/bounce/v1").json()] == [held["id"]]
    r = b.api("POST", "/api/admin/suspend/v1", {"domain": "example.com", "reason": "x",
                                                "duration": "1h"})
    assert r.status_code == 503 and b.api("GET", "/api/admin/suspend/v1").json() == []
    # the rules held are still enforced
    b.send(["y@example.com"], headers={"X-Tenant": "kept"})
    wait_for(lambda: "y@example.com" in b.by_recipient("AdminBounce"))


def test_apply_and_restore_reach_every_node_and_a_returning_node_ends_cancelled_rules(nodes):
    a, b, c = nodes("node-a"), nodes("node-b"), nodes("node-c")
    b.send(["held-on-b@example.com"])
    r = a.api("POST", "/api/admin/bounce/v1", {"domain": "example.com", "reason": "oops",
                                                "duration": "1h", "grace": "1h"})
    rule = r.json()["id"]
    assert b.api("GET", "/api/admin/bounce/v1").json()[0]["state"] == "pending"
    r = c.api("POST", "/api/admin/bounce/v1/apply", {"id": rule})
    assert r.status_code == 200 and set(r.json()["nodes"].values()) == {"confirmed"}
    wait_for(lambda: "held-on-b@example.com" in b.by_recipient("AdminBounce"))
    # a restore on one node puts back what every node retained
    r = a.api("POST", "/api/admin/bounce/v1/restore", {"id": rule})
    assert r.status_code == 200 and set(r.json()["nodes"].values()) == {"confirmed"}
    wait_for(lambda: "held-on-b@example.com" in b.by_recipient("AdminRestore"))
    assert b.api("GET", "/metrics.json").json()["scheduled"] == {"example.com": 1}
    # a node down while a rule is cancelled ends it when it returns
    second = _bounce(a, tenant="t2")["id"]
    c.kill()
    r = a.api("DELETE", "/api/admin/bounce/v1", {"id": second})
    assert r.json()["nodes"]["node-c"] == "unreachable"
    c.start()
    assert c.api("GET", "/api/admin/bounce/v1").json() == []


def test_the_bounce_list_sums_what_each_node_bounced(nodes):
    a, b, c = nodes("node-a"), nodes("node-b"), nodes("node-c")
    b.send(["b1@example.com", "b2@example.com"])
    c.send(["c1@example.com"])
    rule = _bounce(a, domain="example.com")["id"]
    wait_for(lambda: len(b.records("AdminBounce")) == 2 and len(c.records("AdminBounce")) == 1)

    def entry() -> dict:
        return next(r for r in a.api("GET", "/api/admin/bounce/v1").json() if r["id"] == rule)

    listed = wait_for(lambda: (e := entry())["total_bounced"] == 3 and e)  # heartbeats: 2 s
    assert listed["bounced"] == {"example.com": 3}
    assert {n: x["total_bounced"] for n, x in listed["nodes"].items()} == \
        {"node-a": 0, "node-b": 2, "node-c": 1}


def test_an_automatic_rule_holds_on_every_node(nodes, tmp_path):
    from .test_automation import TSS04, RespondingSink, automation

    sink = RespondingSink(tmp_path, {"throttled.example": TSS04})
    try:
        a = nodes("node-a", extra=automation("throttled.example", "suspend", "1h"),
                  routes={"throttled.example": f"127.0.0.1:{sink.port}"})
        b = nodes("node-b")
        a.send(["t1@throttled.example"])
        [rule] = wait_for(lambda: b.api("GET", "/api/admin/suspend/v1").json())
        assert rule["domain"] == "throttled.example"
        assert rule["reason"].startswith("automation: ")
        assert [r["id"] for r in a.api("GET", "/api/admin/suspend/v1").json()] == [rule["id"]]
        audit = [e for e in b.api("GET", "/api/admin/audit/v1").json()
                 if e["rule_id"] == rule["id"]]
        assert [e["actor"] for e in audit] == ["cluster:node-a"]
        # an ordinary rule: cancelled on node-b, it ends on node-a too
        r = b.api("DELETE", "/api/admin/suspend/v1", {"id": rule["id"]})
        assert r.json()["nodes"] == {"node-a": "confirmed", "node-b": "confirmed"}
        assert a.api("GET", "/api/admin/suspend/v1").json() == []
    finally:
        sink.stop()


def test_a_redis_that_lost_the_rules_gets_them_again_from_the_nodes(nodes, redis):
    a, b = nodes("node-a"), nodes("node-b")
    rule = _bounce(a, campaign="spring")["id"]
    redis.stop()
    redis.start()  # empty: nothing is saved to disk
    # the nodes find Redis again, see it lost the rules and publish them again
    import redis as redis_client

    with redis_client.Redis.from_url(redis.url) as r:
        wait_for(lambda: r.hexists("sluice:rules", rule), timeout=30)
    c = nodes("node-c")  # starts after the loss: learns the rule from Redis
    assert [r["id"] for r in c.api("GET", "/api/admin/bounce/v1").json()] == [rule]
    c.send(["z@example.com"], headers={"X-Campaign": "spring"})
    wait_for(lambda: "z@example.com" in c.by_recipient("AdminBounce"))
    assert b.api("GET", "/api/admin/bounce/v1").json()[0]["id"] == rule
