"""Admin bounce: everything about cancelling queued mail, in one place.

A bounce rule selects queues by its criteria (``Criteria``). From the moment
it is in force (before the API answers):

- every checkpoint asks ``check`` (one call): reception (``reception.intake``),
  promotion and requeue (``queues.manager``), right before DATA (the sites,
  in whichever process delivers);
- mail waiting in ready queues is taken out through the delivery port
  (``withdraw``, which both process modes implement) and bounced;
- a background sweep removes every matching message from the spool, chunk
  by chunk, each chunk committed with its AdminBounce records;
- the rule's counts (per queue) are kept in memory and, in the same
  transaction as each bounce, in the spool.

The AdminBounce record is made here and only here (``record``; a sweep's
chunk is packed, an internal optimization of the log writer that expands it
to exactly the records ``record`` makes). docs/ARCHITECTURE.md, "The flow of a
bounce", walks through it; the tests of each guarantee are listed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..logs import ADMIN_BOUNCE, Response, make_record, message_record, pack_records
from ..spool import Inbound, Spool, Stored
from .book import BOUNCE, Rule
from .criteria import Criteria
from .kind import RuleKind

if TYPE_CHECKING:
    from ..delivery.dispatch import DeliveryPort

log = logging.getLogger(__name__)

SWEEP_CHUNK = 2000


def admin_bounce_response(reason: str) -> Response:
    """What an AdminBounce record says (KumoMTA's wording)."""
    return Response(551, f"Administrator bounced with reason: {reason}", (5, 7, 1))


class Bounces(RuleKind):
    kind = BOUNCE

    def __init__(self, spool: Spool, nodeid: str, stats: Counter[str]) -> None:
        super().__init__(spool)
        self.nodeid = nodeid
        self.stats = stats
        self.delivery: DeliveryPort | None = None  # set by the wiring
        self._sweeps: dict[str, asyncio.Task] = {}

    # -- selection ---------------------------------------------------------

    async def dry_run(self, criteria: Criteria,
                      samples: int = 10) -> tuple[dict[str, int], list[Stored] | None]:
        """What a rule with ``criteria`` would bounce now: messages per queue,
        and (with per-message criteria, which are counted message by message)
        up to ``samples`` of them."""
        queues = self.spool.index.matching(criteria)
        where = criteria.message_filter()
        if where is None:
            return queues, None
        return await self.spool.count_matching(queues, where, samples)

    # -- records and counts ------------------------------------------------

    def _meta(self, queue: str) -> dict[str, str]:
        return self.spool.index.parts(queue).meta()

    def record(self, msg: Stored, rule: Rule) -> bytes | None:
        """The AdminBounce record of a stored message (None: the rule logs nothing)."""
        if rule.suppress_logging:
            return None
        return message_record(ADMIN_BOUNCE, msg, admin_bounce_response(rule.reason),
                              meta=self._meta(msg.queue), nodeid=self.nodeid)

    def record_at_reception(self, item: Inbound, rule: Rule, *, size: int, meta: dict[str, str],
                            session_id: str | None) -> bytes | None:
        """The AdminBounce record of a message caught as it is received."""
        if rule.suppress_logging:
            return None
        return make_record(ADMIN_BOUNCE, msg_id=item.id, sender=item.sender,
                           recipient=item.recipient, queue=str(item.queue), meta=meta, size=size,
                           created=item.created, num_attempts=0, nodeid=self.nodeid,
                           response=admin_bounce_response(rule.reason),
                           reception_protocol=item.protocol, session_id=session_id,
                           now=item.created)

    def _pack(self, msgs: list[Stored], rule: Rule) -> bytes | None:
        """A sweep chunk's records, as one outbox entry (see ``logs.pack_records``)."""
        if rule.suppress_logging:
            return None
        rows = [(m.id, m.sender, m.recipient, m.queue, m.size, m.created, m.attempts, m.protocol)
                for m in msgs]
        return pack_records(ADMIN_BOUNCE, admin_bounce_response(rule.reason), self.nodeid,
                            {q: self._meta(q) for q in {m.queue for m in msgs}}, rows)

    def counted(self, rule_id: str, per_queue: Iterable[tuple[str, int]]) -> int:
        """Count messages a rule bounced (already committed); returns how many."""
        rule = self.book.get(rule_id)
        total = 0
        for queue, n in per_queue:
            total += n
            if rule is not None:
                rule.bounced[queue] += n
        self.stats[ADMIN_BOUNCE] += total
        return total

    # -- bouncing claimed mail ---------------------------------------------

    async def bounce_claimed(self, msg: Stored, rule: Rule,
                             before: list[bytes] | None = None) -> bool:
        """Bounce a message that is in hand (promoted, waiting or stopped
        before DATA); ``before``: records that come first (a TransientFailure)."""
        rec = self.record(msg, rule)
        records = (before or []) + ([rec] if rec else [])
        done = await self.spool.finish(msg, records, rule.id)
        if done:
            self.counted(rule.id, [(msg.queue, 1)])
        return done

    # -- a rule comes into force, or ends ----------------------------------

    async def _in_force(self, rule: Rule, at_start: bool) -> None:
        if not at_start and self.delivery is not None:
            for msg in await self.delivery.withdraw(rule):
                await self.bounce_claimed(msg, rule)
        task = asyncio.create_task(self._sweep(rule), name=f"bounce-sweep-{rule.id}")
        self._sweeps[rule.id] = task
        task.add_done_callback(lambda t, rid=rule.id: self._sweeps.pop(rid, None)
                               if self._sweeps.get(rid) is t else None)

    async def _ended(self, rule: Rule) -> None:
        task = self._sweeps.pop(rule.id, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = list(self._sweeps.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _sweep(self, rule: Rule) -> None:
        """Remove every message the rule matches from the spool, chunk by chunk."""
        def pack(msgs: list[Stored]) -> bytes | None:
            return self._pack(msgs, rule)

        done: set[str] = set()  # queues with nothing more to take (new mail is caught on arrival)
        try:
            while rule.active():
                queues = [q for q in self.spool.index.matching(rule.criteria) if q not in done]
                if not queues:
                    return
                swept = await self.spool.sweep(queues, SWEEP_CHUNK, pack, rule.id,
                                               rule.criteria.message_filter())
                done.update(swept.exhausted)
                self.counted(rule.id, swept.removed.items())
                await asyncio.sleep(0)  # let reception and delivery run between chunks
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bounce sweep %s failed", rule.id)

    # -- what the list shows -----------------------------------------------

    @staticmethod
    def counts(rule: Rule) -> dict[str, Any]:
        return {"bounced": {q: n for q, n in rule.bounced.items() if n},
                "total_bounced": rule.total_bounced}
