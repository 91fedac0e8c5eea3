"""Admin bounce: everything about cancelling queued mail, and undoing it.

A bounce rule selects mail by its criteria (``Criteria``: queue criteria,
and per-message ones). From the moment it is in force (before the API
answers):

- every checkpoint asks ``check`` (one call): reception (``reception.intake``),
  promotion and requeue (``queues.manager``), right before DATA (the sites,
  in whichever process delivers);
- while the rule is in its grace (*pending*), matching mail is held: not
  delivered, not bounced, no record; cancelling it then releases the mail as
  if nothing happened;
- once it is active: mail waiting in ready queues is taken out through the
  delivery port (``withdraw``, which both process modes implement) and
  bounced; a background sweep removes every matching message from the spool,
  chunk by chunk, each chunk committed with its AdminBounce records;
- the rule's counts (per queue) are kept in memory and, in the same
  transaction as each bounce, in the spool.

What a bounce removes is retained for ``[admin] bounce_retention``
(``spool.retain``), so that ``restore`` can put it back, with an
AdminRestore record each, whatever became of the rule since.

The AdminBounce and AdminRestore records are made here and only here
(``record``, and the packed chunks that the log writer expands to exactly
those records). docs/ARCHITECTURE.md, "The flow of a bounce", walks through
it; the tests of each guarantee are listed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import audit
from ..audit import SERVER, Actor
from ..config import AdminSettings
from ..logs import ADMIN_BOUNCE, ADMIN_RESTORE, Response, make_record, message_record, pack_records
from ..spool import Inbound, Spool, Stored
from .book import BOUNCE, Rule
from .criteria import Criteria
from .kind import RuleKind

if TYPE_CHECKING:
    from ..delivery.dispatch import DeliveryPort

log = logging.getLogger(__name__)

SWEEP_CHUNK = 2000
RESTORE_CHUNK = 2000
RETENTION_CHECK_SECONDS = 30.0


def admin_bounce_response(reason: str) -> Response:
    """What an AdminBounce record says (KumoMTA's wording)."""
    return Response(551, f"Administrator bounced with reason: {reason}", (5, 7, 1))


def admin_restore_response(reason: str) -> Response:
    """What an AdminRestore record says: the reason of the bounce it undoes."""
    return Response(250, f"Administrator restored: {reason}", (2, 0, 0))


@dataclass(slots=True)
class Restored:
    """What a restore put back, per queue, and how many of the rule's
    bounces were no longer retained."""

    restored: dict[str, int]
    unavailable: int

    @property
    def total(self) -> int:
        return sum(self.restored.values())


class Bounces(RuleKind):
    kind = BOUNCE

    def __init__(self, spool: Spool, nodeid: str, stats: Counter[str],
                 admin: AdminSettings | None = None) -> None:
        super().__init__(spool)
        self.nodeid = nodeid
        self.stats = stats
        self.admin = admin or AdminSettings()
        spool.retain = self.admin.bounce_retention > 0
        self.delivery: DeliveryPort | None = None  # set by the wiring
        # set by the wiring: recompute which queues are held; wake promotion
        self.holds_changed: Callable[[], Awaitable[None]] | None = None
        self.wake: Callable[[], None] | None = None
        self._sweeps: dict[str, asyncio.Task] = {}
        self._graces: dict[str, asyncio.Task] = {}
        self._retention: asyncio.Task | None = None

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

    def holds_queue(self, name: str, parts: Any) -> bool:
        """A pending rule holds this whole queue (for the spool's holds)."""
        rule = self.check(name, parts)
        return rule is not None and rule.pending()

    async def held(self, rule: Rule) -> dict[str, int]:
        """Messages a pending rule holds now, per queue."""
        queues = self.spool.index.matching(rule.criteria)
        counts, _ = await self.spool.count_matching(queues, rule.criteria.message_filter(),
                                                    samples=0, states=(2,))
        return counts

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

    def _pack(self, kind: str, response: Response, msgs: list[Stored]) -> bytes:
        """A chunk's records, as one outbox entry (see ``logs.pack_records``)."""
        rows = [(m.id, m.sender, m.recipient, m.queue, m.size, m.created, m.attempts, m.protocol)
                for m in msgs]
        return pack_records(kind, response, self.nodeid,
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
        if rule.pending():
            self._graces[rule.id] = asyncio.create_task(self._grace(rule),
                                                        name=f"bounce-grace-{rule.id}")
            if self.holds_changed is not None:
                await self.holds_changed()  # hold the queues it selects
            return
        await self._active(rule, withdraw=not at_start)

    async def _active(self, rule: Rule, withdraw: bool = True) -> None:
        """The rule bounces from now on: what waits in ready queues, then the spool."""
        if withdraw and self.delivery is not None:
            for msg in await self.delivery.withdraw(rule):
                await self.bounce_claimed(msg, rule)
        task = asyncio.create_task(self._sweep(rule), name=f"bounce-sweep-{rule.id}")
        self._sweeps[rule.id] = task
        task.add_done_callback(lambda t, rid=rule.id: self._sweeps.pop(rid, None)
                               if self._sweeps.get(rid) is t else None)

    async def _grace(self, rule: Rule) -> None:
        try:
            await asyncio.sleep(max(0.0, rule.grace_until - time.time()))
            if self.book.get(rule.id) is rule:
                await self._changed()  # now a bounce everywhere, not a hold
                await self._active(rule)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("ending the grace of bounce rule %s failed", rule.id)
        finally:
            if self._graces.get(rule.id) is asyncio.current_task():
                self._graces.pop(rule.id, None)

    async def apply(self, rule_id: str, actor: Actor = SERVER, request: Any = None) -> Rule | None:
        """End a pending rule's grace now; None if there is no active rule with that id."""
        rule = self.book.get(rule_id)
        if rule is None:
            return None
        was_pending = rule.pending()
        now = time.time()
        await self.spool.set_grace(rule_id, min(rule.grace_until, now), audit=audit.entry(
            "bounce-apply", actor, rule_id=rule_id, request=request,
            result={"applied": was_pending}))
        if was_pending:
            rule.grace_until = now
            task = self._graces.pop(rule_id, None)
            if task is not None:
                task.cancel()
            await self._changed()
            await self._active(rule)
        return rule

    async def _ended(self, rule: Rule) -> None:
        for tasks in (self._sweeps, self._graces):
            task = tasks.pop(rule.id, None)
            if task is not None:
                task.cancel()
        if rule.pending() and self.holds_changed is not None:
            await self.holds_changed()  # what it held goes on as if nothing happened

    async def start_retention(self) -> None:
        """Drop retained mail past its retention, or over the byte cap."""
        self._retention = asyncio.create_task(self._retention_loop(), name="bounce-retention")

    async def stop(self) -> None:
        tasks = [*self._sweeps.values(), *self._graces.values()]
        if self._retention is not None:
            tasks.append(self._retention)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_CHECK_SECONDS)
            try:
                await self.drop_expired_retention()
            except Exception:
                log.exception("dropping retained mail failed")

    async def drop_expired_retention(self) -> int:
        """Drop what retention no longer keeps, and forget rules ended longer ago."""
        keep = self.admin.bounce_retention
        before = time.time() - keep
        dropped = 0
        while n := await self.spool.drop_retained(before, self.admin.bounce_retention_max_bytes):
            dropped += n
            await asyncio.sleep(0)
        await self.spool.forget_rules(before)
        return dropped

    async def _sweep(self, rule: Rule) -> None:
        """Remove every message the rule matches from the spool, chunk by chunk."""
        response = admin_bounce_response(rule.reason)

        def pack(msgs: list[Stored]) -> bytes | None:
            return None if rule.suppress_logging else self._pack(ADMIN_BOUNCE, response, msgs)

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

    # -- undo --------------------------------------------------------------

    async def restore(self, rule_id: str, actor: Actor = SERVER,
                      request: Any = None) -> Restored | None:
        """Put back everything bounce rule ``rule_id`` bounced that is still
        retained (ending the rule first if it is in force). None: no such
        rule, or it ended longer than a retention window ago."""
        row = await self.spool.get_rule(rule_id)
        if row is None or row["kind"] != BOUNCE:
            return None
        if row["ended"] is not None and row["ended"] < time.time() - self.admin.bounce_retention:
            return None
        if self.book.get(rule_id) is not None:
            await self.cancel(rule_id, actor, request, action="cancel-for-restore")
        response = admin_restore_response(row["reason"])
        suppress = row["suppress_logging"]

        def pack(msgs: list[Stored]) -> bytes | None:
            return None if suppress else self._pack(ADMIN_RESTORE, response, msgs)

        restored: Counter[str] = Counter()
        while chunk := await self.spool.restore(rule_id, RESTORE_CHUNK, pack):
            restored.update(chunk)
            if self.wake is not None:
                self.wake()  # restored mail may be due now
            await asyncio.sleep(0)
        row = await self.spool.get_rule(rule_id)
        assert row is not None
        unavailable = (sum(row["bounced"].values()) - sum(row["restored"].values())
                       - await self.spool.retained_count(rule_id))
        result = Restored(dict(restored), max(0, unavailable))
        self.stats[ADMIN_RESTORE] += result.total
        await self.spool.add_audit(audit.entry(
            "bounce-restore", actor, rule_id=rule_id, request=request,
            result={"restored": result.restored, "total_restored": result.total,
                    "unavailable": result.unavailable}))
        return result

    # -- what the list shows -----------------------------------------------

    @staticmethod
    def counts(rule: Rule) -> dict[str, Any]:
        return {"bounced": {q: n for q, n in rule.bounced.items() if n},
                "total_bounced": rule.total_bounced}
