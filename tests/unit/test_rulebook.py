"""The in-memory book of active bounce/suspend rules (SPEC section 8)."""

from __future__ import annotations

import time
import types
from collections import Counter

import pytest

from sluice.message import parse_queue_name
from sluice.rules import store
from sluice.rules.control import RuleControl
from sluice.rules.criteria import Criteria
from sluice.rules.store import BOUNCE, SUSPEND, Rule, RuleBook, new_rule


def q(name: str):
    return name, parse_queue_name(name)


def bounce(reason="r", ttl=300.0, **kw) -> Rule:
    return new_rule(BOUNCE, Criteria.build(**kw), reason, time.time() + ttl)


def suspend(reason="r", ttl=300.0, **kw) -> Rule:
    return new_rule(SUSPEND, Criteria.build(**kw), reason, time.time() + ttl)


class Clock:
    """Stands in for the ``time`` module inside sluice.rules.store."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock(1_700_000_000.0)
    monkeypatch.setattr(store, "time", types.SimpleNamespace(time=c.time))
    return c


# ---- new_rule / Rule -----------------------------------------------------------

def test_new_rule_fields():
    before = time.time()
    r = new_rule(BOUNCE, Criteria.build(domain="Yahoo.COM"), "bad send", before + 60,
                 suppress_logging=True)
    assert r.kind == BOUNCE
    assert r.criteria.domain == "yahoo.com"
    assert r.reason == "bad send"
    assert r.expires == before + 60
    assert before <= r.created <= time.time()
    assert r.suppress_logging is True
    assert r.total_bounced == 0
    assert len(r.id) == 36 and r.id.count("-") == 4


def test_new_rule_ids_are_unique():
    ids = {bounce().id for _ in range(50)}
    assert len(ids) == 50


def test_total_bounced_sums_queues():
    r = bounce()
    r.bounced["a.com"] += 3
    r.bounced["b.com"] += 4
    assert r.total_bounced == 7


def test_rule_active(clock):
    r = Rule(id="x", kind=BOUNCE, criteria=Criteria(), reason="r", created=0, expires=clock.now + 10)
    assert r.active()
    assert r.active(clock.now + 9.9)
    assert not r.active(clock.now + 10)
    clock.now += 10
    assert not r.active()


def test_row_round_trip():
    r = bounce(reason="why", campaign="c", domain="d.com")
    row = r.to_row()
    row["bounced"] = {"c:@d.com": 5}
    back = Rule.from_row(row)
    assert back.id == r.id
    assert back.kind == BOUNCE
    assert back.criteria == r.criteria
    assert back.reason == "why"
    assert back.created == r.created
    assert back.expires == r.expires
    assert back.suppress_logging is False
    assert back.total_bounced == 5
    back.bounced["new.com"] += 1  # still a counter
    assert back.bounced["new.com"] == 1


# ---- add / match / remove --------------------------------------------------------

def test_add_and_match():
    book = RuleBook()
    r = bounce(domain="yahoo.com")
    book.add(r)
    assert book.match(BOUNCE, *q("yahoo.com")) is r
    assert book.match(BOUNCE, *q("c:t@yahoo.com!out.com")) is r
    assert book.bounce_for(*q("t@yahoo.com")) is r
    assert book.match(BOUNCE, *q("gmail.com")) is None
    assert book.get(r.id) is r
    assert book.get(r.id, BOUNCE) is r
    assert book.get(r.id, SUSPEND) is None


def test_empty_book_matches_nothing():
    book = RuleBook()
    assert book.match(BOUNCE, *q("yahoo.com")) is None
    assert book.suspended(*q("yahoo.com")) is None
    assert not book.has(BOUNCE)
    assert book.active(BOUNCE) == []


def test_everything_rule_matches_every_queue():
    book = RuleBook()
    r = bounce()
    book.add(r)
    for name in ["a.com", "c:@b.com", "t@c.com!r.com", "c:t@[192.0.2.1]"]:
        assert book.bounce_for(*q(name)) is r


def test_kinds_are_separate():
    book = RuleBook()
    b = bounce(domain="a.com")
    s = suspend(domain="b.com")
    book.add(b)
    book.add(s)
    assert book.bounce_for(*q("a.com")) is b
    assert book.suspended(*q("a.com")) is None
    assert book.suspended(*q("b.com")) is s
    assert book.bounce_for(*q("b.com")) is None
    assert book.has(BOUNCE) and book.has(SUSPEND)
    assert book.active(BOUNCE) == [b]
    assert book.active(SUSPEND) == [s]
    # either kind keeps mail from being sent
    assert book.stops(*q("a.com")) and book.stops(*q("b.com"))
    assert not book.stops(*q("c.com"))


def test_remove():
    book = RuleBook()
    r = bounce(tenant="acme")
    book.add(r)
    assert book.bounce_for(*q("acme@x.com")) is r  # now cached
    assert book.remove(r.id) is r
    assert book.bounce_for(*q("acme@x.com")) is None
    assert book.get(r.id) is None
    assert not book.has(BOUNCE)
    assert book.remove(r.id) is None
    assert book.remove("no-such-id") is None


def test_add_after_cached_miss_takes_effect():
    book = RuleBook()
    assert book.bounce_for(*q("c:@x.com")) is None  # caches the miss
    r = bounce(campaign="c")
    book.add(r)
    assert book.bounce_for(*q("c:@x.com")) is r


def test_version_changes_on_every_change():
    book = RuleBook()
    v0 = book.version
    r = bounce()
    book.add(r)
    v1 = book.version
    book.remove(r.id)
    v2 = book.version
    assert v0 < v1 < v2


def test_and_semantics_through_book():
    book = RuleBook()
    r = bounce(campaign="spring", domain="Yahoo.COM")
    book.add(r)
    assert book.bounce_for(*q("spring:acme@yahoo.com")) is r
    assert book.bounce_for(*q("spring:@yahoo.com")) is r
    assert book.bounce_for(*q("Spring:@yahoo.com")) is None
    assert book.bounce_for(*q("spring:@gmail.com")) is None
    assert book.bounce_for(*q("acme@yahoo.com")) is None


def test_queue_names_rule_through_book():
    book = RuleBook()
    r = bounce(queue_names=["acme@yahoo.com"])
    book.add(r)
    assert book.bounce_for(*q("acme@yahoo.com")) is r
    assert book.bounce_for(*q("c:acme@yahoo.com")) is None
    assert book.bounce_for(*q("yahoo.com")) is None


def test_several_matching_rules_one_is_returned():
    book = RuleBook()
    a = bounce(domain="x.com")
    b = bounce(tenant="t")
    book.add(a)
    book.add(b)
    assert book.bounce_for(*q("t@x.com")) in (a, b)
    assert book.bounce_for(*q("x.com")) is a
    assert book.bounce_for(*q("t@y.com")) is b
    book.remove(a.id)
    assert book.bounce_for(*q("t@x.com")) is b


# ---- expiry --------------------------------------------------------------------------

def test_expired_rule_does_not_match():
    book = RuleBook()
    r = bounce(ttl=-1, domain="yahoo.com")
    book.add(r)
    assert book.bounce_for(*q("yahoo.com")) is None
    assert book.get(r.id) is None
    assert book.active(BOUNCE) == []
    assert book.expired() == [r]


def test_rule_stops_matching_when_it_expires_even_if_cached(clock):
    book = RuleBook()
    r = new_rule(BOUNCE, Criteria.build(domain="yahoo.com"), "r", clock.now + 60)
    book.add(r)
    assert book.bounce_for(*q("yahoo.com")) is r  # cached hit
    clock.now += 59
    assert book.bounce_for(*q("yahoo.com")) is r
    clock.now += 1
    assert book.bounce_for(*q("yahoo.com")) is None
    assert book.get(r.id) is None
    assert book.expired() == [r]


def test_expired_cached_rule_falls_through_to_other_active_rule(clock):
    book = RuleBook()
    short = new_rule(BOUNCE, Criteria.build(domain="yahoo.com"), "short", clock.now + 10)
    long = new_rule(BOUNCE, Criteria.build(tenant="t"), "long", clock.now + 1000)
    book.add(short)
    book.add(long)
    assert book.bounce_for(*q("t@yahoo.com")) is short
    clock.now += 20
    assert book.bounce_for(*q("t@yahoo.com")) is long


def test_active_is_sorted_by_created_and_skips_expired(clock):
    book = RuleBook()
    rules = []
    for i, ttl in enumerate([100, -1, 50, 200]):
        r = Rule(id=f"r{i}", kind=BOUNCE, criteria=Criteria.build(domain=f"d{i}.com"),
                 reason="x", created=clock.now - 10 * (4 - i) if i != 2 else clock.now - 100,
                 expires=clock.now + ttl)
        rules.append(r)
        book.add(r)
    assert [r.id for r in book.active(BOUNCE)] == ["r2", "r0", "r3"]
    assert [r.id for r in book.expired()] == ["r1"]


def test_load_keeps_active_and_reports_expired():
    now = time.time()
    active = bounce(domain="a.com").to_row()
    old = new_rule(SUSPEND, Criteria.build(tenant="t"), "old", now - 5).to_row()
    book = RuleBook()
    v = book.version
    expired = book.load([active, old])
    assert expired == [old["id"]]
    assert book.get(active["id"]) is not None
    assert book.get(old["id"]) is None
    assert book.bounce_for(*q("a.com")).id == active["id"]
    assert book.suspended(*q("t@x.com")) is None
    assert book.version > v


# ---- same criteria / replacement ----------------------------------------------------

def test_same_criteria_finds_normalized_equal_rules():
    book = RuleBook()
    a = bounce(domain="yahoo.com")
    b = bounce(domain="yahoo.com", campaign="c")
    s = suspend(domain="yahoo.com")
    for r in (a, b, s):
        book.add(r)
    assert book.same_criteria(BOUNCE, Criteria.build(domain="Yahoo.COM")) == [a]
    assert book.same_criteria(SUSPEND, Criteria.build(domain="YAHOO.com")) == [s]
    assert book.same_criteria(BOUNCE, Criteria.build(domain="yahoo.com", campaign="c")) == [b]
    assert book.same_criteria(BOUNCE, Criteria.build(domain="yahoo.com", campaign="C")) == []
    assert book.same_criteria(BOUNCE, Criteria.build()) == []


class FakeSpool:
    """Enough of SqliteSpool for RuleControl.create/cancel, with an empty spool."""

    def __init__(self) -> None:
        self.saved: list[tuple[dict, list[str]]] = []
        self.deleted: list[str] = []
        self.counts: dict[str, int] = {}
        self.parts: dict = {}

    async def save_rule(self, row, replaces=()):
        self.saved.append((row, list(replaces)))

    async def delete_rules(self, ids):
        self.deleted.extend(ids)

    async def load_rules(self):
        return []

    async def sweep(self, *a, **kw):  # pragma: no cover - nothing to sweep
        return {}


def make_control():
    spool = FakeSpool()
    book = RuleBook()
    purged: list[Rule] = []
    changed: list[int] = []

    async def purge_ready(rule):
        purged.append(rule)

    async def rules_changed():
        changed.append(1)

    control = RuleControl(spool, book, pack_bounces=lambda m, r: None,
                          purge_ready=purge_ready, rules_changed=rules_changed,
                          stats=Counter(), owned=set())
    return control, spool, book, purged, changed


async def test_new_rule_with_same_criteria_replaces_old():
    control, spool, book, purged, changed = make_control()
    old = await control.create(BOUNCE, Criteria.build(domain="Yahoo.COM"), "first",
                               time.time() + 300)
    new = await control.create(BOUNCE, Criteria.build(domain="yahoo.com"), "second",
                               time.time() + 300)
    assert new.id != old.id
    assert book.get(old.id) is None
    assert book.get(new.id) is new
    assert book.active(BOUNCE) == [new]
    assert book.bounce_for(*q("yahoo.com")).reason == "second"
    # the spool was told to replace the old row
    assert spool.saved[0][1] == []
    assert spool.saved[1] == (new.to_row(), [old.id])
    assert purged == [old, new]
    assert len(changed) == 2
    await control.stop()


async def test_different_criteria_or_kind_do_not_replace():
    control, spool, book, *_ = make_control()
    a = await control.create(BOUNCE, Criteria.build(domain="yahoo.com"), "a", time.time() + 300)
    b = await control.create(BOUNCE, Criteria.build(domain="yahoo.com", tenant="t"), "b",
                             time.time() + 300)
    s = await control.create(SUSPEND, Criteria.build(domain="yahoo.com"), "s", time.time() + 300)
    assert {r.id for r in book.active(BOUNCE)} == {a.id, b.id}
    assert book.active(SUSPEND) == [s]
    assert all(replaces == [] for _, replaces in spool.saved)
    await control.stop()


async def test_cancel_rule():
    control, spool, book, *_ = make_control()
    r = await control.create(SUSPEND, Criteria.build(campaign="c"), "hold", time.time() + 300)
    assert book.suspended(*q("c:@x.com")) is r
    assert await control.cancel(BOUNCE, r.id) is False  # wrong kind
    assert await control.cancel(SUSPEND, r.id) is True
    assert spool.deleted == [r.id]
    assert book.suspended(*q("c:@x.com")) is None
    assert await control.cancel(SUSPEND, r.id) is False
    assert await control.cancel(SUSPEND, "no-such-id") is False
    await control.stop()
