"""The SQLite spool and its queue index, in process, on a real database file."""

from __future__ import annotations

import time

import pytest

from sluice.logs import ADMIN_BOUNCE, Response, make_record
from sluice.rules.criteria import Criteria
from sluice.spool import SqliteSpool

from ..support import inbound, read_records, until


@pytest.fixture
async def spool(tmp_path):
    s = SqliteSpool(tmp_path / "var")
    await s.open()
    yield s
    await s.close()


def record(item) -> bytes:
    return make_record("Reception", msg_id=item.id, sender=item.sender, recipient=item.recipient,
                       queue=str(item.queue), meta={}, size=5, created=item.created,
                       num_attempts=0, nodeid="00000000-0000-4000-8000-000000000000",
                       response=Response(250, "OK", (2, 0, 0), "."))


async def test_receive_counts_queues_and_knows_their_parts(spool):
    items = [inbound("c:t@a.com"), inbound("c:t@a.com"), inbound("b.com", held=True)]
    await spool.receive(b"hello", items)
    index = spool.index
    assert index.counts() == {"c:t@a.com": 2, "b.com": 1}
    assert index.total() == 3
    assert index.parts("c:t@a.com").campaign == "c" and index.parts("c:t@a.com").tenant == "t"
    assert index.held() == {"b.com"}
    assert index.matching(Criteria(campaign="c")) == {"c:t@a.com": 2}
    assert index.matching(Criteria()) == {"c:t@a.com": 2, "b.com": 1}
    # held mail is not due for promotion
    claimed = await spool.claim_due(time.time() + 1, 10)
    assert sorted(m.queue for m in claimed) == ["c:t@a.com", "c:t@a.com"]


async def test_index_is_rebuilt_from_the_database_at_open(tmp_path):
    first = SqliteSpool(tmp_path / "var")
    await first.open()
    await first.receive(b"x", [inbound("t@a.com"), inbound("b.com")])
    await first.close()
    again = SqliteSpool(tmp_path / "var")
    await again.open()
    try:
        assert again.index.counts() == {"t@a.com": 1, "b.com": 1}
        assert again.index.parts("t@a.com").tenant == "t"
    finally:
        await again.close()


async def test_a_claim_is_in_hand_until_its_fate_is_written(spool):
    items = [inbound("a.com", f"r{i}@a.com") for i in range(3)]
    await spool.receive(b"x", items)
    claimed = await spool.claim_due(time.time() + 1, 10)
    assert spool.in_hand == {i.id for i in items}
    done, retried, released = claimed
    assert await spool.finish(done, [])
    assert await spool.retry(retried, time.time() + 3600, [])
    await spool.release([released])
    assert spool.in_hand == set()
    assert spool.index.counts() == {"a.com": 2}
    # finishing twice does nothing the second time
    assert not await spool.finish(done, [])
    # the retried one is due later, the released one now
    assert [m.id for m in await spool.claim_due(time.time() + 1, 10)] == [released.id]


async def test_orphans_are_claims_in_no_hand(spool):
    await spool.receive(b"x", [inbound("a.com", "a@a.com"), inbound("a.com", "b@a.com")])
    lost, kept = await spool.claim_due(time.time() + 1, 10)
    spool.let_go([lost.id])
    assert await spool.adopt_orphans() == [lost]
    assert spool.in_hand == {lost.id, kept.id}
    assert await spool.adopt_orphans() == []


async def test_sweep_takes_scheduled_held_and_orphans_but_not_what_is_in_hand(spool):
    queued, held, orphan, in_hand = (inbound("a.com", f"{k}@a.com") for k in
                                     ("queued", "held", "orphan", "hand"))
    await spool.receive(b"x", [orphan, in_hand])
    await spool.claim_due(time.time() + 1, 10)
    spool.let_go([orphan.id])
    await spool.receive(b"x", [queued])
    await spool.receive(b"x", [held])
    await spool.hold(["a.com"])  # holds what is scheduled: queued and held
    packed: list[list] = []

    def pack(msgs):
        packed.append(sorted(m.recipient for m in msgs))
        return None

    swept = await spool.sweep(["a.com"], 100, pack, "rule-1")
    assert (swept.removed, swept.exhausted) == ({"a.com": 3}, ["a.com"])
    assert packed == [["held@a.com", "orphan@a.com", "queued@a.com"]]
    assert spool.index.counts() == {"a.com": 1}
    # what is left is the one in hand, still claimed
    assert spool.in_hand == {in_hand.id}
    assert await spool.adopt_orphans() == []
    assert await spool.finish((await spool.get_message(in_hand.id)), [])


async def test_sweep_writes_its_packed_records_in_the_same_commit(spool, tmp_path):
    items = [inbound("a.com", f"r{i}@a.com") for i in range(3)]
    await spool.receive(b"x", items)
    entry = make_record(ADMIN_BOUNCE, msg_id="whole-batch", sender="", recipient="",
                        queue="a.com", meta={}, size=0, created=0, num_attempts=0,
                        nodeid="00000000-0000-4000-8000-000000000000",
                        response=Response(551, "gone", (5, 7, 1)))
    swept = await spool.sweep(["a.com"], 2, lambda msgs: entry, "rule-1")
    assert (swept.removed, swept.exhausted) == ({"a.com": 2}, [])  # the chunk limit
    assert spool.index.counts() == {"a.com": 1}
    await until(lambda: read_records(tmp_path / "var", ADMIN_BOUNCE))
    assert [r["id"] for r in read_records(tmp_path / "var", ADMIN_BOUNCE)] == ["whole-batch"]


async def test_hold_and_unhold_queues(spool):
    await spool.receive(b"x", [inbound("a.com"), inbound("b.com")])
    await spool.hold(["a.com"])
    assert spool.index.held() == {"a.com"}
    assert [m.queue for m in await spool.claim_due(time.time() + 1, 10)] == ["b.com"]
    await spool.unhold(["a.com"])
    assert spool.index.held() == set()
    assert [m.queue for m in await spool.claim_due(time.time() + 1, 10)] == ["a.com"]


async def test_rules_and_their_counts_are_stored(spool):
    rule = {"id": "r1", "kind": "bounce", "criteria": Criteria(domain="a.com").as_dict(),
            "reason": "why", "created": 1.0, "expires": time.time() + 60,
            "suppress_logging": False}
    await spool.save_rule(rule)
    caught = inbound("a.com")
    caught.terminal, caught.rule_id = True, "r1"
    caught.records.append(record(caught))
    await spool.receive(b"x", [caught, inbound("a.com")])
    await spool.sweep(["a.com"], 10, lambda msgs: None, "r1")
    [row] = await spool.load_rules()
    assert row["bounced"] == {"a.com": 2}  # one caught at reception, one swept
    await spool.save_rule({**rule, "id": "r2"}, replaces=["r1"])
    assert [r["id"] for r in await spool.load_rules()] == ["r2"]
    # the replaced rule ended, and is kept (for restores) until forgotten
    ended = await spool.get_rule("r1")
    assert ended["ended"] is not None and ended["bounced"] == {"a.com": 2}
    await spool.end_rules(["r2"], time.time())
    assert await spool.load_rules() == []
    assert await spool.forget_rules(time.time() + 1) == 2
    assert await spool.get_rule("r1") is None


async def test_per_message_filter_in_sweep_and_count(spool):
    from sluice.spool.base import MessageFilter

    old = time.time() - 7200
    items = [inbound("a.com", "x@a.com"), inbound("a.com", "y@a.com", created=old),
             inbound("b.com", "z@b.com", created=old)]
    items[0].sender = "Spam@Bad.Example"
    items[1].sender = "ok@good.example"
    items[2].sender = "spam2@bad.example"
    for item in items:
        await spool.receive(b"x", [item])
    bad = MessageFilter(sender="*@bad.example")
    counts, samples = await spool.count_matching(["a.com", "b.com"], bad, samples=1)
    assert counts == {"a.com": 1, "b.com": 1} and len(samples) == 1
    counts, _ = await spool.count_matching(["a.com", "b.com"],
                                           MessageFilter(created_before=time.time() - 3600))
    assert counts == {"a.com": 1, "b.com": 1}
    swept = await spool.sweep(["a.com", "b.com"], 100, lambda msgs: None, "r", bad)
    assert swept.removed == {"a.com": 1, "b.com": 1}
    assert sorted(swept.exhausted) == ["a.com", "b.com"]
    assert spool.index.counts() == {"a.com": 1}
    [left] = await spool.claim_due(time.time() + 1, 10)
    assert left.sender == "ok@good.example"
