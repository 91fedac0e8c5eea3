"""The two rule kinds, in process, on a real spool: ``Bounces`` and ``Suspensions``."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from sluice.rules.bounce import Bounces
from sluice.rules.criteria import Criteria
from sluice.rules.suspend import Suspensions
from sluice.spool import SqliteSpool

from ..support import inbound, read_records, until

NODE = "00000000-0000-4000-8000-000000000000"


class Port:
    """A delivery port holding some claimed messages in its ready queues."""

    def __init__(self) -> None:
        self.waiting: list = []
        self.withdrawn_for: list[str] = []

    async def withdraw(self, rule):
        self.withdrawn_for.append(rule.id)
        taken = [m for m in self.waiting if rule.criteria.matches(m.queue, _parts(m.queue))]
        self.waiting = [m for m in self.waiting if m not in taken]
        return taken


def _parts(queue):
    from sluice.message import parse_queue_name
    return parse_queue_name(queue)


@pytest.fixture
async def parts(tmp_path):
    spool = SqliteSpool(tmp_path / "var")
    await spool.open()
    stats: Counter[str] = Counter()
    bounces, suspensions = Bounces(spool, NODE, stats), Suspensions(spool)
    bounces.delivery = Port()
    changes: list[str] = []

    async def changed():
        changes.append("changed")

    bounces.changed = suspensions.changed = changed
    yield spool, bounces, suspensions, changes, stats
    await bounces.stop()
    await spool.close()


def later(seconds: float = 300.0) -> float:
    return time.time() + seconds


async def test_bounce_sweeps_matching_mail_with_one_record_each(parts, tmp_path):
    spool, bounces, _, changes, stats = parts
    await spool.receive(b"x", [inbound("c@a.com", "1@a.com"), inbound("c@a.com", "2@a.com"),
                               inbound("b.com", "3@b.com")])
    assert await bounces.dry_run(Criteria(tenant="c")) == ({"c@a.com": 2}, None)
    rule = await bounces.create(Criteria(tenant="c"), "wrong tenant", later())
    assert changes == ["changed"]  # in force everywhere before create returns
    await until(lambda: spool.index.counts() == {"b.com": 1})
    await until(lambda: len(read_records(tmp_path / "var", "AdminBounce")) == 2)
    recs = read_records(tmp_path / "var", "AdminBounce")
    assert {r["recipient"] for r in recs} == {"1@a.com", "2@a.com"}
    assert {r["response"]["content"] for r in recs} == {
        "Administrator bounced with reason: wrong tenant"}
    assert {r["reception_protocol"] for r in recs} == {"ESMTP"}
    assert Bounces.counts(rule) == {"bounced": {"c@a.com": 2}, "total_bounced": 2}
    assert stats["AdminBounce"] == 2
    [row] = await spool.load_rules()
    assert row["bounced"] == {"c@a.com": 2}


async def test_bounce_takes_waiting_mail_back_from_the_delivery_port(parts, tmp_path):
    spool, bounces, _, _, _ = parts
    await spool.receive(b"x", [inbound("a.com", "w@a.com"), inbound("b.com", "o@b.com")])
    claimed = await spool.claim_due(time.time() + 1, 10)
    bounces.delivery.waiting = list(claimed)
    rule = await bounces.create(Criteria(domain="a.com"), "stop", later())
    assert bounces.delivery.withdrawn_for == [rule.id]
    assert [m.recipient for m in bounces.delivery.waiting] == ["o@b.com"]
    await until(lambda: read_records(tmp_path / "var", "AdminBounce"))
    assert [r["recipient"] for r in read_records(tmp_path / "var", "AdminBounce")] == ["w@a.com"]
    assert {m.id for m in claimed if m.recipient == "o@b.com"} == spool.in_hand


async def test_check_is_the_one_question_every_checkpoint_asks(parts):
    _, bounces, suspensions, _, _ = parts
    rule = await bounces.create(Criteria(campaign="spring", domain="a.com"), "r", later())
    assert bounces.check("spring:@a.com", _parts("spring:@a.com")) is rule
    assert bounces.check("spring:@b.com", _parts("spring:@b.com")) is None
    assert bounces.check("Spring:@a.com", _parts("Spring:@a.com")) is None
    assert suspensions.check("spring:@a.com", _parts("spring:@a.com")) is None


async def test_same_criteria_replace_and_cancel(parts):
    spool, bounces, _, changes, _ = parts
    first = await bounces.create(Criteria(domain="a.com"), "first", later())
    second = await bounces.create(Criteria(domain="a.com"), "second", later())
    assert [r.id for r in bounces.active()] == [second.id]
    assert [r["id"] for r in await spool.load_rules()] == [second.id]
    assert await bounces.cancel(first.id) is None
    assert await bounces.cancel(second.id) is second
    assert bounces.active() == [] and await spool.load_rules() == []
    assert changes == ["changed"] * 3


async def test_expired_rules_are_pruned_and_not_loaded(parts):
    spool, bounces, _, _, _ = parts
    short = await bounces.create(Criteria(domain="a.com"), "short", later(0.2))
    await until(lambda: not short.active())
    assert [r.id for r in await bounces.prune()] == [short.id]
    assert await spool.load_rules() == []
    # a stored rule that ended while the server was down is dropped at load
    await spool.save_rule({**short.to_row(), "id": "old"})
    await bounces.load(await spool.load_rules())
    assert bounces.active() == [] and await spool.load_rules() == []


async def test_suspension_holds_queues_and_cancel_releases_them(parts):
    spool, _, suspensions, _, _ = parts
    released: list[int] = []
    suspensions.on_release = lambda: released.append(1)
    await spool.receive(b"x", [inbound("t@a.com"), inbound("b.com")])
    rule = await suspensions.create(Criteria(tenant="t"), "hold", later())
    assert spool.index.held() == {"t@a.com"}
    assert [m.queue for m in await spool.claim_due(time.time() + 1, 10)] == ["b.com"]
    assert await suspensions.cancel(rule.id) is rule
    assert spool.index.held() == set() and released == [1]
    assert [m.queue for m in await spool.claim_due(time.time() + 1, 10)] == ["t@a.com"]


async def test_suspensions_are_loaded_and_hold_again_at_start(parts):
    spool, _, suspensions, _, _ = parts
    await spool.receive(b"x", [inbound("t@a.com")])
    await spool.save_rule({"id": "s1", "kind": "suspend",
                           "criteria": Criteria(tenant="t").as_dict(), "reason": "r",
                           "created": time.time(), "expires": later(), "suppress_logging": False})
    await suspensions.load(await spool.load_rules())
    assert [r.id for r in suspensions.active()] == ["s1"]
    assert spool.index.held() == {"t@a.com"}
