"""The queue manager in process, on a real spool: promotion, expiry, the rule
checks on the way, and the fate of each attempt."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from sluice.config import settings_from_dict
from sluice.delivery.mx import MxResolver
from sluice.delivery.routes import Router
from sluice.logs import NO_ATTEMPT, Attempt, Response
from sluice.queues.manager import QueueManager
from sluice.rules.bounce import Bounces
from sluice.rules.criteria import Criteria
from sluice.rules.suspend import Suspensions
from sluice.spool import SqliteSpool

from ..support import inbound, read_records, until

NODE = "00000000-0000-4000-8000-000000000000"


class Port:
    """A delivery port that keeps what it is handed."""

    def __init__(self) -> None:
        self.handed: list = []

    async def dispatch(self, msg, parts) -> None:
        self.handed.append((msg, parts))

    async def withdraw(self, rule):
        return []

    async def rules_changed(self, bounces, suspensions) -> None:
        pass

    async def figures(self):
        return {}

    async def stop(self, grace):
        return [m for m, _ in self.handed]


@pytest.fixture
async def queues(tmp_path):
    settings = settings_from_dict({
        "server": {"data_dir": str(tmp_path / "var")},
        "queue": {"retry_interval": "10m", "max_retry_interval": "1h", "max_age": "1d"},
    })
    spool = SqliteSpool(tmp_path / "var")
    await spool.open()
    stats: Counter[str] = Counter()
    bounces, suspensions = Bounces(spool, NODE, stats), Suspensions(spool)
    manager = QueueManager(settings, spool, bounces, suspensions,
                           Router({}, MxResolver(resolver=object())), stats, NODE)
    port = manager.delivery = bounces.delivery = Port()
    yield manager, spool, port, tmp_path / "var"
    await bounces.stop()
    await spool.close()


async def test_promotion_hands_due_mail_over_with_its_queue(queues):
    manager, spool, port, _ = queues
    await spool.receive(b"x", [inbound("c:t@a.com", "1@a.com"), inbound("b.com", "2@b.com")])
    assert await manager._promote_once() == 2
    assert {(m.recipient, p.campaign, p.tenant) for m, p in port.handed} == {
        ("1@a.com", "c", "t"), ("2@b.com", None, None)}
    assert manager.in_memory == 2
    assert await manager._promote_once() == 0  # nothing else is due


async def test_expired_mail_is_not_attempted(queues):
    manager, spool, port, data = queues
    await spool.receive(b"x", [inbound("a.com", "old@a.com", created=time.time() - 2 * 86400)])
    await manager._promote_once()
    assert port.handed == []
    await until(lambda: read_records(data, "Expiration"))
    [rec] = read_records(data, "Expiration")
    assert (rec["recipient"], rec["response"]["enhanced_code"]["subject"]) == ("old@a.com", 4)
    assert spool.index.counts() == {} and spool.in_hand == set()


async def test_a_bounce_rule_stops_mail_at_promotion(queues):
    manager, spool, port, data = queues
    await manager.bounces.create(Criteria(domain="a.com"), "no", time.time() + 60)
    await spool.receive(b"x", [inbound("a.com", "x@a.com")])  # a queue the sweep has not seen
    await manager.bounces.stop()  # no sweep: promotion alone must stop it
    await manager._promote_once()
    assert port.handed == []
    await until(lambda: read_records(data, "AdminBounce"))
    assert spool.index.counts() == {}


async def test_outcomes_delivered_bounced_and_retried(queues):
    manager, spool, port, data = queues
    await spool.receive(b"x", [inbound("a.com", f"{k}@a.com") for k in ("ok", "no", "later")])
    await manager._promote_once()
    by = {m.recipient: m for m, _ in port.handed}
    attempt = Attempt("site", ("mx.a.com", "192.0.2.1"), "0b6c4b8e-3c5e-4c7a-9a0c-0d3f3d1c2b1a")
    await manager.delivered(by["ok@a.com"], Response(250, "queued", (2, 0, 0), "."), attempt)
    await manager.bounced(by["no@a.com"], Response(550, "no such user", (5, 1, 1), "RCPT TO"),
                          attempt)
    before = time.time()
    await manager.attempt_failed(by["later@a.com"], Response(451, "later", (4, 3, 0), "."),
                                 attempt)
    assert spool.in_hand == set()
    await until(lambda: len(read_records(data)) == 3)
    kinds = {r["recipient"]: r for r in read_records(data)}
    assert {k: r["type"] for k, r in kinds.items()} == {
        "ok@a.com": "Delivery", "no@a.com": "Bounce", "later@a.com": "TransientFailure"}
    assert kinds["ok@a.com"]["session_id"] == attempt.session_id
    assert kinds["ok@a.com"]["num_attempts"] == 1
    left = await spool.get_message(by["later@a.com"].id)
    assert left.attempts == 1
    assert before + 0.9 * 600 <= left.due <= time.time() + 1.1 * 600  # retry_interval, +/-10%


async def test_retry_under_a_bounce_rule_is_bounced(queues):
    manager, spool, port, data = queues
    await spool.receive(b"x", [inbound("a.com", "x@a.com")])
    await manager._promote_once()
    [(msg, _)] = port.handed
    await manager.bounces.create(Criteria(domain="a.com"), "stop", time.time() + 60)
    await manager.attempt_failed(msg, Response(451, "later", (4, 3, 0), "."), NO_ATTEMPT)
    await until(lambda: read_records(data, "AdminBounce"))
    assert [r["type"] for r in read_records(data) if r["recipient"] == "x@a.com"] == [
        "TransientFailure", "AdminBounce"]


async def test_message_stopped_by_a_suspension_is_held_again(queues):
    manager, spool, port, _ = queues
    await spool.receive(b"x", [inbound("a.com", "x@a.com")])
    await manager._promote_once()
    [(msg, _)] = port.handed
    await manager.suspensions.create(Criteria(domain="a.com"), "hold", time.time() + 60)
    assert not manager.may_send_data(msg)
    await manager.dispose_stopped(msg)
    assert spool.index.held() == {"a.com"} and spool.in_hand == set()
    assert await spool.claim_due(time.time() + 1, 10) == []
