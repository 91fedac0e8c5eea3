"""Rules in memory: ``Rule`` and the per-kind ``RuleBook`` (what every
checkpoint asks: which active rule applies to this queue?)."""

from __future__ import annotations

import time
import types

import pytest

from sluice.message import parse_queue_name
from sluice.rules import book as book_module
from sluice.rules.book import BOUNCE, SUSPEND, Rule, RuleBook, new_rule
from sluice.rules.criteria import Criteria


def q(name: str):
    return name, parse_queue_name(name)


def bounce(reason="r", ttl=300.0, **kw) -> Rule:
    return new_rule(BOUNCE, Criteria.build(**kw), reason, time.time() + ttl)


def suspend(reason="r", ttl=300.0, **kw) -> Rule:
    return new_rule(SUSPEND, Criteria.build(**kw), reason, time.time() + ttl)


class Clock:
    """Stands in for the ``time`` module inside sluice.rules.book."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock(1_700_000_000.0)
    monkeypatch.setattr(book_module, "time", types.SimpleNamespace(time=c.time))
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
    book = RuleBook(BOUNCE)
    r = bounce(domain="yahoo.com")
    book.add(r)
    assert book.match(*q("yahoo.com")) is r
    assert book.match(*q("c:t@yahoo.com!out.com")) is r
    assert book.match(*q("t@yahoo.com")) is r
    assert book.match(*q("gmail.com")) is None
    assert book.get(r.id) is r


def test_empty_book_matches_nothing():
    book = RuleBook(BOUNCE)
    assert book.match(*q("yahoo.com")) is None
    assert not book
    assert book.active() == []


def test_everything_rule_matches_every_queue():
    book = RuleBook(BOUNCE)
    r = bounce()
    book.add(r)
    for name in ["a.com", "c:@b.com", "t@c.com!r.com", "c:t@[192.0.2.1]"]:
        assert book.match(*q(name)) is r


def test_a_book_holds_one_kind():
    book = RuleBook(BOUNCE)
    b = bounce(domain="a.com")
    s = suspend(domain="b.com")
    assert book.load([b.to_row(), s.to_row()]) == []
    assert book.active() == [b]
    assert book.match(*q("b.com")) is None


def test_remove():
    book = RuleBook(BOUNCE)
    r = bounce(tenant="acme")
    book.add(r)
    assert book.match(*q("acme@x.com")) is r  # now cached
    assert book.remove(r.id) is r
    assert book.match(*q("acme@x.com")) is None
    assert book.get(r.id) is None
    assert not book
    assert book.remove(r.id) is None
    assert book.remove("no-such-id") is None


def test_add_after_cached_miss_takes_effect():
    book = RuleBook(BOUNCE)
    assert book.match(*q("c:@x.com")) is None  # caches the miss
    r = bounce(campaign="c")
    book.add(r)
    assert book.match(*q("c:@x.com")) is r


def test_version_changes_on_every_change():
    book = RuleBook(BOUNCE)
    v0 = book.version
    r = bounce()
    book.add(r)
    v1 = book.version
    book.remove(r.id)
    v2 = book.version
    assert v0 < v1 < v2


def test_and_semantics_through_book():
    book = RuleBook(BOUNCE)
    r = bounce(campaign="spring", domain="Yahoo.COM")
    book.add(r)
    assert book.match(*q("spring:acme@yahoo.com")) is r
    assert book.match(*q("spring:@yahoo.com")) is r
    assert book.match(*q("Spring:@yahoo.com")) is None
    assert book.match(*q("spring:@gmail.com")) is None
    assert book.match(*q("acme@yahoo.com")) is None


def test_queue_names_rule_through_book():
    book = RuleBook(BOUNCE)
    r = bounce(queue_names=["acme@yahoo.com"])
    book.add(r)
    assert book.match(*q("acme@yahoo.com")) is r
    assert book.match(*q("c:acme@yahoo.com")) is None
    assert book.match(*q("yahoo.com")) is None


def test_several_matching_rules_one_is_returned():
    book = RuleBook(BOUNCE)
    a = bounce(domain="x.com")
    b = bounce(tenant="t")
    book.add(a)
    book.add(b)
    assert book.match(*q("t@x.com")) in (a, b)
    assert book.match(*q("x.com")) is a
    assert book.match(*q("t@y.com")) is b
    book.remove(a.id)
    assert book.match(*q("t@x.com")) is b


# ---- expiry --------------------------------------------------------------------------

def test_expired_rule_does_not_match():
    book = RuleBook(BOUNCE)
    r = bounce(ttl=-1, domain="yahoo.com")
    book.add(r)
    assert book.match(*q("yahoo.com")) is None
    assert book.get(r.id) is None
    assert book.active() == []
    assert book.expired() == [r]


def test_rule_stops_matching_when_it_expires_even_if_cached(clock):
    book = RuleBook(BOUNCE)
    r = new_rule(BOUNCE, Criteria.build(domain="yahoo.com"), "r", clock.now + 60)
    book.add(r)
    assert book.match(*q("yahoo.com")) is r  # cached hit
    clock.now += 59
    assert book.match(*q("yahoo.com")) is r
    clock.now += 1
    assert book.match(*q("yahoo.com")) is None
    assert book.get(r.id) is None
    assert book.expired() == [r]


def test_expired_cached_rule_falls_through_to_other_active_rule(clock):
    book = RuleBook(BOUNCE)
    short = new_rule(BOUNCE, Criteria.build(domain="yahoo.com"), "short", clock.now + 10)
    long = new_rule(BOUNCE, Criteria.build(tenant="t"), "long", clock.now + 1000)
    book.add(short)
    book.add(long)
    assert book.match(*q("t@yahoo.com")) is short
    clock.now += 20
    assert book.match(*q("t@yahoo.com")) is long


def test_active_is_sorted_by_created_and_skips_expired(clock):
    book = RuleBook(BOUNCE)
    rules = []
    for i, ttl in enumerate([100, -1, 50, 200]):
        r = Rule(id=f"r{i}", kind=BOUNCE, criteria=Criteria.build(domain=f"d{i}.com"),
                 reason="x", created=clock.now - 10 * (4 - i) if i != 2 else clock.now - 100,
                 expires=clock.now + ttl)
        rules.append(r)
        book.add(r)
    assert [r.id for r in book.active()] == ["r2", "r0", "r3"]
    assert [r.id for r in book.expired()] == ["r1"]


def test_load_keeps_active_and_reports_expired():
    now = time.time()
    active = bounce(domain="a.com").to_row()
    old = new_rule(BOUNCE, Criteria.build(tenant="t"), "old", now - 5).to_row()
    book = RuleBook(BOUNCE)
    v = book.version
    expired = book.load([active, old])
    assert expired == [old["id"]]
    assert book.get(active["id"]) is not None
    assert book.get(old["id"]) is None
    assert book.match(*q("a.com")).id == active["id"]
    assert book.match(*q("t@x.com")) is None
    assert book.version > v


# ---- same criteria / replacement ----------------------------------------------------

def test_same_criteria_finds_normalized_equal_rules():
    book = RuleBook(BOUNCE)
    a = bounce(domain="yahoo.com")
    b = bounce(domain="yahoo.com", campaign="c")
    for r in (a, b):
        book.add(r)
    assert book.same_criteria(Criteria.build(domain="Yahoo.COM")) == [a]
    assert book.same_criteria(Criteria.build(domain="yahoo.com", campaign="c")) == [b]
    assert book.same_criteria(Criteria.build(domain="yahoo.com", campaign="C")) == []
    assert book.same_criteria(Criteria.build()) == []
